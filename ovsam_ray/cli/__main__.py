"""``python -m ovsam_ray.cli``: the same as ``ovsam-ray``."""

import sys

from ovsam_ray.cli import main

sys.exit(main())
