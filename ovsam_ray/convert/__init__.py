"""Datasets -> WebDataset shards (DESIGN §4): COCO, LVIS v1, SA-1B, ImageNet-style classification
and detector results. Every converter writes ``<output>/shard-%06d.tar`` with N images each,
deterministic keys, and a ``_convert.json`` summary."""

from collections.abc import Callable
from typing import Any

from ovsam_ray.convert.coco import convert_coco
from ovsam_ray.convert.detections import convert_detections
from ovsam_ray.convert.imagenet import convert_imagenet, load_synset_map
from ovsam_ray.convert.lvis import convert_lvis
from ovsam_ray.convert.mixed import write_mixed
from ovsam_ray.convert.records import ConvertError
from ovsam_ray.convert.reshard import reshard
from ovsam_ray.convert.sa1b import convert_sa1b
from ovsam_ray.data.tar_writer import ConvertSummary, Sample, sample_key, write_shards
from ovsam_ray.registry import Registry

#: Dataset format name -> ``convert_<format>`` (its arguments are all keywords named like the flags of
#: ``ovsam-ray convert <format>``).
CONVERTERS: Registry[Callable[..., Any]] = Registry(
    "dataset format",
    {
        "coco": convert_coco,
        "lvis": convert_lvis,
        "sa1b": convert_sa1b,
        "imagenet": convert_imagenet,
        "detections": convert_detections,
    },
)

__all__ = [
    "CONVERTERS",
    "ConvertError",
    "ConvertSummary",
    "Sample",
    "convert_coco",
    "convert_detections",
    "convert_imagenet",
    "convert_lvis",
    "convert_sa1b",
    "load_synset_map",
    "reshard",
    "sample_key",
    "write_mixed",
    "write_shards",
]
