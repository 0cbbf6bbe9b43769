"""`python -m infer`: see infer/cli.py."""

import sys

from infer.cli import main

sys.exit(main())
