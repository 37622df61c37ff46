#!/usr/bin/env python3
"""Shard NIfTI scans as a SLURM job array plus a merge job: ``python jobs/shard.py --help``
(installed package: ``brainmt-shard-jobs``)."""

import sys

from brainmt.launch.shard_jobs import main

if __name__ == "__main__":
    sys.exit(main())
