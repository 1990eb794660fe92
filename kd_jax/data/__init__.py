"""Data: random-access sources, grain pipelines, data sets by name.

`build(config.data)` returns the splits of the configured data set
(`Datasets`): `data.name` is one of `BUILDERS` (synthetic, acdc, synapse,
idrid_grading, idrid_lesions, drive, palm, pneumoniamnist, totalseg, folder,
tfds, and the unlabelled image_folder and shared_images; see
`kd_jax.data.registry` for each one's options, `options(name)` for their
defaults). Examples are dicts; `Datasets.targets` names the label keys
they carry and their kinds (`kd_jax.data.targets`). Real volumetric sets also
give `volumes`, whole 3D volumes for volume-wise Dice/HD95.

`data.unlabelled = dict(sources=(...), per_batch=k)` (any data set) adds an
unlabelled pool, `Datasets.unlabelled`, for semi-supervised distillation:
`pipeline.train_batches(..., unlabelled=, unlabelled_per_batch=)` mixes k
of its images into every batch, flagged by the key "labelled";
`check_unlabelled(datasets, batch_size)` checks k against the batch.
"""
from kd_jax.data import device_augment  # noqa: F401
from kd_jax.data import pipeline  # noqa: F401
from kd_jax.data import synthetic  # noqa: F401
from kd_jax.data.registry import (BUILDERS, OPTIONS, Datasets, ImagePool,
                                  build, check_unlabelled, options)
from kd_jax.data.targets import Target

__all__ = ["BUILDERS", "OPTIONS", "Datasets", "ImagePool", "Target", "build",
           "check_unlabelled", "options"]
