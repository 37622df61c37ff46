#!/usr/bin/env python3
"""Run a Ray Tune sweep (ASHA) as one submitit job on SLURM or locally: ``python sweeps/tune.py --help``
(installed package: ``brainmt-sweep``)."""

import sys

from brainmt.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
