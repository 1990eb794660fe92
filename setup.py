"""kd_jax: knowledge distillation for medical imaging in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # The versions tested (STACK.md: jax 0.10.2, flax 0.12.8); flax 0.12
    # itself requires jax >= 0.10, so no older jax installs beside it.
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.6",
    "tensorflow-datasets>=4.9.6",
    "grain>=0.2.2",
    "ml_collections>=0.1.1",
    "clu>=0.0.12",
    # clu.metric_writers and clu.periodic_actions import TensorFlow's summary
    # writer; without these two the TensorBoard event files cannot be written.
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    "numpy",
    "scipy",
    # kd_jax.probe fits its linear probes and k-NN with scikit-learn.
    "scikit-learn",
    "matplotlib",
    "h5py",
    "pillow",
]

setup(
    name="kd_jax",
    version="0.1.0",
    description="Knowledge distillation for medical imaging in JAX/Flax.",
    packages=find_packages(include=["kd_jax", "kd_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # JAX's own accelerator builds (the extra names jax itself declares):
        # without one, JAX runs on the CPU even where a GPU or TPU is present.
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # nbclient + ipykernel run the colabs/ notebooks (tests/test_colabs.py).
        # pyflakes: tests/test_static_names.py (undefined names).
        "test": ["pytest>=7", "pytest-xdist", "nbformat>=5.7", "nbclient>=0.8",
                 "ipykernel>=6", "pyflakes>=3"],
        # PyTorch eager is the baseline the benchmarks compare against.
        "bench": ["torch>=2.1"],
        # kd_jax.convert reads PyTorch / safetensors files; its tests compare
        # the imported models with timm's and torchvision's.
        "reference": ["torch>=2.1", "torchvision", "timm>=1.0",
                      "safetensors>=0.4"],
    },
)
