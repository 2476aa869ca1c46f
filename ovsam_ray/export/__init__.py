"""Label output (committed Parquet) -> the formats other tools read: COCO instances json or results
(RLE), YOLO segmentation txt (polygons), Label Studio predictions json (brush RLE or polygons),
SA-1B-style per-image json, labelled WebDataset shards; and a Ray Data join of labels and images.
Every exporter streams the Parquet files batch by batch: memory does not grow with the output."""

from collections.abc import Callable
from typing import Any

from ovsam_ray.export.brush import brush_rle_to_mask, mask_to_brush_rle
from ovsam_ray.export.coco import export_coco
from ovsam_ray.export.labelstudio import export_labelstudio, labelstudio_config
from ovsam_ray.export.polygons import mask_to_polygons
from ovsam_ray.export.ray_data import read_labelled_images
from ovsam_ray.export.sa1b import export_sa1b
from ovsam_ray.export.wds import export_wds
from ovsam_ray.export.yolo import export_yolo
from ovsam_ray.registry import Registry

#: Format name -> ``export_<format>(labels, output, **options)``; ``ovsam-ray export <format>``.
EXPORTERS: Registry[Callable[..., Any]] = Registry(
    "export format",
    {
        "coco": export_coco,
        "yolo": export_yolo,
        "labelstudio": export_labelstudio,
        "sa1b": export_sa1b,
        "wds": export_wds,
    },
)

__all__ = [
    "EXPORTERS",
    "brush_rle_to_mask",
    "export_coco",
    "export_labelstudio",
    "export_sa1b",
    "export_wds",
    "export_yolo",
    "labelstudio_config",
    "mask_to_brush_rle",
    "mask_to_polygons",
    "read_labelled_images",
]
