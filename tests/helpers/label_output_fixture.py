"""The checked-in label output of an earlier schema (``tests/golden/label_output_v*``) and what
each exporter writes from it: :func:`export_all` runs every exporter and returns the sha256 of
every file it wrote, by format and path."""

from __future__ import annotations

import hashlib
import os
import shutil

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden")
# The label outputs written by earlier schema versions, each as the label job left it.
OLD_LABEL_OUTPUTS = ("label_output_v2",)
# Bookkeeping of the exporters (which files they wrote, for --overwrite): not the export itself.
WRITTEN_RECORD = "_ovsam_written.json"


def old_label_output(name: str, tmp: str) -> dict[str, str]:
    """A writable copy of the fixture ``name`` under ``tmp``: its ``labels``, ``shards`` and ``vocab``."""
    root = os.path.join(tmp, name)
    shutil.copytree(os.path.join(GOLDEN, name), root)
    return {
        "root": root,
        "labels": os.path.join(root, "labels"),
        "shards": os.path.join(root, "shards"),
        "vocab": os.path.join(root, "shapes.txt"),
        "digests": os.path.join(root, "export_digests.json"),
    }


def tree_digests(root: str) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it. A file that names ``root``
    (YOLO's data.yaml holds the export's absolute path) is hashed with ``<root>`` in its place."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                data = f.read().replace(os.path.abspath(root).encode(), b"<root>")
            out[os.path.relpath(path, root).replace(os.sep, "/")] = hashlib.sha256(data).hexdigest()
    return dict(sorted(out.items()))


def export_all(labels: str, shards: str, out_root: str) -> dict[str, dict[str, str]]:
    """Every exporter (and the variants that change its bytes) on ``labels``: format -> path -> sha256."""
    from ovsam_ray.export import EXPORTERS

    runs = {
        "coco": ("coco", "instances.json", {}),
        "coco-results": ("coco", "results.json", {"results": True}),
        "coco-with-images": ("coco", "with_images/instances.json", {"shards": shards, "with_images": True}),
        "yolo": ("yolo", "yolo", {"shards": shards, "with_images": True}),
        "labelstudio-brush": ("labelstudio", "tasks.json", {}),
        "labelstudio-polygons": ("labelstudio", "tasks.json", {"masks": "polygon"}),
        "sa1b": ("sa1b", "sa1b", {"shards": shards}),
        "wds": ("wds", "wds", {"shards": shards}),
    }
    assert set(EXPORTERS) == {fmt for fmt, _, _ in runs.values()}, "a new exporter: add it here"
    digests = {}
    for run, (fmt, target, options) in runs.items():
        folder = os.path.join(out_root, run)
        os.makedirs(folder)
        EXPORTERS[fmt](labels, os.path.join(folder, target), **options)
        digests[run] = {p: d for p, d in tree_digests(folder).items() if not p.endswith(WRITTEN_RECORD)}
    return digests
