"""Write a teacher cache: ``python scripts/cache_teacher.py --config X.yaml [key=value]``."""

import sys

from taid.cli import cache_main

sys.exit(cache_main())
