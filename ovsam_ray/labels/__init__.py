"""The label format: what a label job writes and how every other part of the package reads it.

Output layout (local directory or ``s3://`` prefix)::

    <output>/_run.json                  run record (identity checked by a resumed run)
    <output>/<shard>.parquet            one row per input image, OUTPUT_SCHEMA
    <output>/_committed/<shard>.json    commit marker, written LAST

- :mod:`~ovsam_ray.labels.schema`: the Arrow schema of a row and its instances, row validation.
- :mod:`~ovsam_ray.labels.records`: predictions -> instance records.
- :mod:`~ovsam_ray.labels.committer`: the atomic, marker-last commit of one shard.
- :mod:`~ovsam_ray.labels.run_record`: what produced an output folder; the resume check.
- :mod:`~ovsam_ray.labels.reader`: the committed files and their rows, streamed.
- :mod:`~ovsam_ray.labels.scores`: the score an instance is ranked by (COCO export, AP).
- :mod:`~ovsam_ray.labels.categories`: category lists (a COCO json, a vocabulary, a run record).
"""
