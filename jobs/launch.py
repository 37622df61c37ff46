#!/usr/bin/env python3
"""Submit BrainMT training as one (multi-node) SLURM job through submitit: ``python jobs/launch.py --help``
(installed package: ``brainmt-launch``)."""

import sys

from brainmt.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
