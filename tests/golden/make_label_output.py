"""Writes a label output fixture (``tests/golden/label_output_v2/`` was made so): a label output as
the label job writes it, with the input shards and the vocabulary it was labelled from, and
``export_digests.json``: the sha256 of every file each exporter writes from it.

``tests/labels/test_old_label_output.py`` reads these files and never regenerates them: a later
schema must still resume this output (every shard skipped, nothing written) and export it byte
for byte. Run from the repository root only to add another fixture (a new directory, never over
this one): ``.venv/bin/python tests/golden/make_label_output.py tests/golden/label_output_v<N>``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import ray

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "helpers"))

from label_output_fixture import export_all  # noqa: E402

from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names  # noqa: E402
from ovsam_ray.inference import ModelConfig  # noqa: E402
from ovsam_ray.pipeline.label_job import LabelConfig, run_label  # noqa: E402


def main(target: str) -> None:
    target = os.path.abspath(target)
    if os.path.exists(target):
        raise SystemExit(f"{target} exists: a fixture is never written over")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "fixture")
        os.makedirs(root)
        # Relative locations, as `ovsam-ray label --input shards --output labels --vocab shapes.txt`
        # run in the fixture's folder: the run record names them so, and the exporters find the
        # vocabulary and the shards through it from wherever the fixture is copied.
        os.chdir(root)
        with open("shapes.txt", "w") as f:
            f.write("\n".join(shape_vocabulary_names()) + "\n")
        generate_shards("shards", num_images=4, images_per_shard=2, seed=5, image_size=(64, 48), max_objects=2)
        model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab="shapes.txt")
        ray.init(num_cpus=2)
        print(run_label(LabelConfig(input="shards", output="labels", model=model)))
        digests = export_all("labels", "shards", os.path.join(tmp, "exports"))
        with open(os.path.join(root, "export_digests.json"), "w") as f:
            json.dump(digests, f, indent=1, sort_keys=True)
            f.write("\n")
        shutil.copytree(root, target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_label_output.py tests/golden/label_output_v<schema version>")
    main(sys.argv[1])
