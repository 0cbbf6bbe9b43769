"""`python -m train`: see train/cli.py and `python -m train --help`;
`python -m train plot ...`: see train/plot.py."""

import sys

if sys.argv[1:2] == ["plot"]:
    from train.plot import main as plot_main

    sys.exit(plot_main(sys.argv[2:]))

from train.cli import main  # noqa: E402

sys.exit(main())
