"""Random-access data sources: `len(source)`, `source[i] -> dict`.

Examples are `{"image": float32 HWC, "label": int32 HW | int32 (), ...}`;
volume sources yield whole (D, H, W) volumes for volume-wise evaluation.
Every source validates its data when built and raises one `ValueError` that
names the file or key and the fix.

    base        ArraySource, Subset, MapSource, split, seeded_order,
                load_npz, to_float_image, ResizedCache
    volumes     VolumeSource, SliceSource, images_as_volumes
    medical     the shared real data sets (ACDC, IDRiD, DRIVE, PALM,
                PneumoniaMNIST, TotalSegmentator CT)
    synapse     Synapse / TransUNet npz slices and h5 volumes
    folder      FolderCsvSource (image folder + CSV of labels or masks),
                ImageFolderSource (a folder of unlabelled images; large
                images decoded reduced, `read_reduced`)
    tfds_source TfdsSource (array_record TFDS data sets, no TensorFlow)

`get_source(name, **kwargs)` builds one by name (for configs).
"""

from kd_jax.data.sources.base import (ArraySource, MapSource, ResizedCache,
                                      Subset, load_npz, seeded_order, split,
                                      to_float_image)
from kd_jax.data.sources.folder import (FolderCsvSource, ImageFolderSource,
                                      read_reduced)
from kd_jax.data.sources.medical import (ACDC_CLASSES, DATA_ENV, DME_RISKS,
                                         DR_GRADES, IDRID_LESIONS,
                                         IDRID_PHOTO_HW, PALM_CLASSES,
                                         REFERABLE, REFERABLE_GRADE,
                                         SYNAPSE_CLASSES, acdc_slices,
                                         acdc_volumes, drive_vessels,
                                         idrid_grading, idrid_lesions, palm,
                                         pneumonia_mnist, remap_labels,
                                         resolve_data_dir, totalseg_ct,
                                         totalseg_slices)
from kd_jax.data.sources.synapse import (NpzFilesSource, synapse_slices,
                                         synapse_volumes)
from kd_jax.data.sources.tfds_source import TfdsSource
from kd_jax.data.sources.volumes import (SliceSource, VolumeSource,
                                         images_as_volumes)

SOURCES = {
    "acdc": acdc_slices,
    "acdc_volumes": acdc_volumes,
    "idrid_grading": idrid_grading,
    "idrid_lesions": idrid_lesions,
    "drive": drive_vessels,
    "palm": palm,
    "pneumonia_mnist": pneumonia_mnist,
    "totalseg": totalseg_slices,
    "totalseg_volumes": totalseg_ct,
    "synapse": synapse_slices,
    "synapse_volumes": synapse_volumes,
    "folder_csv": FolderCsvSource,
    "image_folder": ImageFolderSource,
    "tfds": TfdsSource,
}


def get_source(name: str, **kwargs):
  """Builds the source registered as `name` (see `SOURCES`) with kwargs."""
  if name not in SOURCES:
    raise ValueError(f"unknown data source {name!r}; choose from "
                     f"{sorted(SOURCES)}")
  return SOURCES[name](**kwargs)
