"""`python -m memkd_ray.cli`: the `memkd-ray` command."""

import sys

from memkd_ray.cli import main

sys.exit(main())
