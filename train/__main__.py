"""`python -m train`: see train/cli.py and `python -m train --help`;
`python -m train plot ...`: see train/plot.py;
`python -m train launch ...`: see train/launch.py."""

import sys

if sys.argv[1:2] == ["plot"]:
    from train.plot import main as plot_main

    sys.exit(plot_main(sys.argv[2:]))
if sys.argv[1:2] == ["launch"]:
    from train.launch import main as launch_main

    sys.exit(launch_main(sys.argv[2:]))

from train.cli import main  # noqa: E402

sys.exit(main())
