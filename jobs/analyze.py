#!/usr/bin/env python3
"""Integrated Gradients as a SLURM job array over subjects, then a merge job: ``python jobs/analyze.py --help``
(installed package: ``brainmt-analyze-jobs``)."""

import sys

from brainmt.analysis.jobs import main

if __name__ == "__main__":
    sys.exit(main())
