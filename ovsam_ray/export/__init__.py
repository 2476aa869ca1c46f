"""Label output (committed Parquet) -> the formats other tools read: COCO instances json (RLE),
YOLO segmentation txt (polygons), Label Studio predictions json, SA-1B-style per-image json.
Every exporter streams the Parquet files batch by batch: memory does not grow with the output."""

from ovsam_ray.export.coco import export_coco
from ovsam_ray.export.labelstudio import export_labelstudio
from ovsam_ray.export.polygons import mask_to_polygons
from ovsam_ray.export.reader import iter_label_batches, iter_label_rows, label_files
from ovsam_ray.export.sa1b import export_sa1b
from ovsam_ray.export.yolo import export_yolo

EXPORTERS = {"coco": export_coco, "yolo": export_yolo, "labelstudio": export_labelstudio, "sa1b": export_sa1b}

__all__ = [
    "EXPORTERS",
    "export_coco",
    "export_labelstudio",
    "export_sa1b",
    "export_yolo",
    "iter_label_batches",
    "iter_label_rows",
    "label_files",
    "mask_to_polygons",
]
