"""Train a student: ``python scripts/train.py --config configs/smoke.yaml [key=value ...]``."""

import sys

from taid.cli import train_main

sys.exit(train_main())
