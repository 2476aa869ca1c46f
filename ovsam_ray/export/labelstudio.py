"""Label output -> Label Studio tasks with pre-annotations ("predictions"), one json, streamed.

Each ``ok`` row becomes a task ``{"data": {"image": <url>, "shard", "key", "image_id"},
"predictions": [{"model_version", "score", "result": [...]}]}``; each instance one result with
the top label and its probability as ``score``:

- ``masks="brush"`` (default): a ``brushlabels`` result holding the mask losslessly as Label
  Studio brush RLE (``"value": {"format": "rle", "rle": [...], "brushlabels": [label]}``; see
  :mod:`ovsam_ray.export.brush`). The labelling config needs ``<BrushLabels>``.
- ``masks="polygon"``: a ``polygonlabels`` result whose ``points`` are percentages of the image
  size (Label Studio's convention), outlining the mask's largest part (see
  :mod:`ovsam_ray.export.polygons`). The labelling config needs ``<PolygonLabels>``.

``from_name``/``to_name`` name the labels tag and the ``<Image>`` tag. ``image_url`` is a template
over ``file_name`` (``<shard>/<key>.<ext>`` as a safe file name: the image's path below
``images/``, see :func:`~ovsam_ray.export.paths.data_file_name`), ``file_url`` (the same, quoted
for a URL), ``shard``, ``key``, ``image_id`` and ``ext`` (the image's extension in its input
shard; ``jpg`` when the shards are unknown) pointing where Label Studio can load the image. The
default, :data:`LOCAL_FILES_URL`, is Label Studio's own local-files URL for the images that
``with_images`` copies to ``<output's folder>/images/`` (serve them with
``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``, ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<output's
folder>`` and a Local Files storage of the project at ``<output's folder>/images``). The task's
``data`` keeps the original ``shard`` and ``key``.

:func:`labelstudio_config` gives a labelling config; the export writes it next to the tasks
(``<output without .json>.config.xml``) with every class a reviewer may pick: the ``classes``
(a vocabulary or COCO json), else the vocabulary the labels were made with (run record), then
any other label the tasks hold.
"""

from __future__ import annotations

import itertools
import json
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any
from xml.sax.saxutils import quoteattr

from ovsam_ray import storage
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.errors import ConfigError
from ovsam_ray.export.brush import mask_to_brush_rle
from ovsam_ray.export.images import ImageCopier, ImageExts, output_folder
from ovsam_ray.export.output import open_output, write_file
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.export.polygons import mask_to_polygons
from ovsam_ray.labels.categories import load_categories, record_vocabulary
from ovsam_ray.labels.reader import iter_label_rows
from ovsam_ray.written import file_and_folder, writing

__all__ = ["LOCAL_FILES_URL", "MASK_FORMATS", "export_labelstudio", "labelstudio_config", "labelstudio_task"]

log = logging.getLogger(__name__)

MASK_FORMATS = ("brush", "polygon")
#: Label Studio's URL of a file below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: the images that
#: ``with_images`` writes, with the export's folder as the document root.
LOCAL_FILES_URL = "/data/local-files/?d=images/{file_url}"
_TAGS = {"brush": ("BrushLabels", "brushlabels"), "polygon": ("PolygonLabels", "polygonlabels")}


def _value(mask: Any, masks: str, label: Any, width: int, height: int, tolerance: float) -> dict[str, Any] | None:
    if masks == "brush":
        return {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]} if mask.any() else None
    polys = mask_to_polygons(mask, tolerance=tolerance)
    if not polys:
        return None
    points = [[round(100.0 * x / width, 4), round(100.0 * y / height, 4)] for x, y in polys[0]]
    return {"points": points, "closed": True, "polygonlabels": [label]}


def labelstudio_task(
    row: dict[str, Any],
    *,
    image_url: str = LOCAL_FILES_URL,
    ext: str = "jpg",
    masks: str = "brush",
    from_name: str = "label",
    to_name: str = "image",
    model_version: str = "ovsam",
    tolerance: float = 1.0,
    min_score: float = 0.0,
) -> dict[str, Any]:
    """One Label Studio task (with its prediction) for an ``ok`` label row."""
    if masks not in MASK_FORMATS:
        raise ConfigError(f"masks={masks!r}: use one of {MASK_FORMATS}")
    width, height = int(row["width"]), int(row["height"])
    results: list[dict[str, Any]] = []
    for i, inst in enumerate(row["instances"] or []):
        score = float(inst.get("label_score") or 0.0)
        if score < min_score:
            continue
        value = _value(decode_rle(inst["rle"]), masks, inst.get("label"), width, height, tolerance)
        if value is None:
            continue
        results.append(
            {
                "id": f"{row['key']}_{i}",
                "type": _TAGS[masks][1],
                "from_name": from_name,
                "to_name": to_name,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "score": score,
                "value": value,
            }
        )
    fields = {"shard": row["shard"], "key": row["key"], "image_id": row.get("image_id") or ""}
    mean = sum(r["score"] for r in results) / len(results) if results else 0.0
    file_name = data_file_name(row["shard"], row["key"], ext)
    url = image_url.format(**fields, ext=ext, file_name=file_name, file_url=urllib.parse.quote(file_name))
    return {
        "data": {"image": url, **fields},
        "predictions": [{"model_version": model_version, "score": mean, "result": results}],
    }


def labelstudio_config(
    labels: list[str], *, masks: str = "brush", from_name: str = "label", to_name: str = "image"
) -> str:
    """A labelling config (XML) with an ``<Image>`` and the ``masks`` labels tag holding ``labels``."""
    tag = _TAGS[masks][0]
    items = "\n".join(f"    <Label value={quoteattr(str(n))}/>" for n in labels)
    return (
        f'<View>\n  <Image name={quoteattr(to_name)} value="$image"/>\n'
        f"  <{tag} name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{items}\n  </{tag}>\n</View>\n"
    )


def export_labelstudio(
    labels: str,
    output: str,
    *,
    image_url: str = LOCAL_FILES_URL,
    masks: str = "brush",
    classes: str | None = None,
    with_images: bool = False,
    shards: str | None = None,
    from_name: str = "label",
    to_name: str = "image",
    model_version: str = "ovsam",
    tolerance: float = 1.0,
    min_score: float = 0.0,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> dict[str, int]:
    """Write the tasks json ``output`` (a JSON list, streamed) and its labelling config (every class
    of ``classes``, else of the labels' vocabulary, then any other label in the tasks); with
    ``with_images`` also the images, below ``<output's folder>/images/``. Returns counts. A file
    already there is refused unless an earlier export wrote it (see :mod:`ovsam_ray.written`)."""
    if masks not in MASK_FORMATS:
        raise ConfigError(f"masks={masks!r}: use one of {MASK_FORMATS}")
    stats = {"tasks": 0, "results": 0, "error_rows": 0}
    needs_ext = with_images or any(f"{{{k}" in image_url for k in ("ext", "file_name", "file_url"))
    exts = ImageExts(labels, shards, s3_endpoint=s3_endpoint) if needs_ext else None
    names: dict[str, None] = dict.fromkeys(_class_names(labels, classes, s3_endpoint))
    copier = ImageCopier(
        exts.urls if exts is not None else {}, storage.join(output_folder(output), "images"), s3_endpoint=s3_endpoint
    )

    def tasks() -> Iterator[dict[str, Any]]:
        for row in iter_label_rows(labels, s3_endpoint=s3_endpoint):
            if row["status"] != "ok":
                stats["error_rows"] += 1
                continue
            ext = (exts(row["shard"], row["key"]) if exts else None) or "jpg"
            task = labelstudio_task(
                row,
                image_url=image_url,
                ext=ext,
                masks=masks,
                from_name=from_name,
                to_name=to_name,
                model_version=model_version,
                tolerance=tolerance,
                min_score=min_score,
            )
            for r in task["predictions"][0]["result"]:
                names.update(dict.fromkeys(r["value"][_TAGS[masks][1]]))
            stats["results"] += len(task["predictions"][0]["result"])
            if with_images:
                copier.add(row["shard"], row["key"])
            yield task

    folder, name = file_and_folder(output)
    own = [name, file_and_folder(_config_url(output))[1]]
    with writing(
        folder,
        "export labelstudio",
        itertools.chain(own, _image_names(labels, exts) if with_images and exts is not None else []),
        overwrite=overwrite,
        s3_endpoint=s3_endpoint,
    ):
        with open_output(output, "w", s3_endpoint=s3_endpoint) as f:
            f.write("[")
            for task in tasks():
                f.write(("," if stats["tasks"] else "") + "\n" + json.dumps(task, separators=(",", ":")))
                stats["tasks"] += 1
            f.write("\n]\n")
        config = labelstudio_config([str(n) for n in names], masks=masks, from_name=from_name, to_name=to_name)
        write_file(_config_url(output), config.encode(), s3_endpoint=s3_endpoint)
        if with_images:
            stats["images_written"] = copier.close()
            stats["images_missing"] = copier.missing
    return stats


def _class_names(labels: str, classes: str | None, s3_endpoint: str | None) -> list[str]:
    """The classes a reviewer may pick: ``classes``' names, else the labels' vocabulary's, else none."""
    if classes:
        return [str(c["name"]) for c in load_categories(classes, s3_endpoint=s3_endpoint)]
    vocab = record_vocabulary(labels, s3_endpoint=s3_endpoint)
    return [str(n) for n in vocab.class_names] if vocab is not None else []


def _image_names(labels: str, exts: ImageExts) -> Iterator[str]:
    for row in iter_label_rows(labels, columns=("shard", "key", "status"), s3_endpoint=exts.s3_endpoint):
        ext = exts(row["shard"], row["key"]) if row["status"] == "ok" else None
        if ext is not None:
            yield "images/" + data_file_name(row["shard"], row["key"], ext)


def _config_url(output: str) -> str:
    return (output[: -len(".json")] if output.endswith(".json") else output) + ".config.xml"
