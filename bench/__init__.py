"""Benchmarks of ovsam_ray, run from the repository root as modules: ``python -m bench.perf ...``.

Results, with their dates, machines and commands, are in ``bench/RESULTS.md``."""
