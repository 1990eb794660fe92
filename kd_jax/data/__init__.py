"""Data: random-access sources, grain pipelines, data sets by name.

`build(config.data)` returns the splits of the configured data set
(`Datasets`): `data.name` is one of `BUILDERS` (synthetic, acdc, synapse,
idrid_grading, idrid_lesions, drive, palm, pneumoniamnist, totalseg, folder,
tfds; see `kd_jax.data.registry` for each one's options, `options(name)` for
their defaults). Examples are dicts; `Datasets.targets` names the label keys
they carry and their kinds (`kd_jax.data.targets`). Real volumetric sets also
give `volumes`, whole 3D volumes for volume-wise Dice/HD95.
"""
from kd_jax.data import pipeline  # noqa: F401
from kd_jax.data import synthetic  # noqa: F401
from kd_jax.data.registry import BUILDERS, OPTIONS, Datasets, build, options
from kd_jax.data.targets import Target

__all__ = ["BUILDERS", "OPTIONS", "Datasets", "Target", "build", "options"]
