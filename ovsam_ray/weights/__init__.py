"""The released weight files and everything that reads or writes them (docs/DESIGN.md §3).

- ``weights.files``: finding files in a folder or an ``s3://`` prefix, reading them safely
  (``weights_only``), the key renames between the released layout and our modules, hashes.
- ``weights.released``: a preset + a folder of released files -> a built ``OVSAM`` (``load_ovsam``),
  and a model -> the released files (``export_released``).

Importing this package loads neither torch nor the model: import the module you need.
"""
