"""`python -m train`: see train/cli.py and `python -m train --help`."""

import sys

from train.cli import main

sys.exit(main())
