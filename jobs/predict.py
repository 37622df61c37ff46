#!/usr/bin/env python3
"""Apply a trained run to new scans as a SLURM job array over the scans, then a merge job:
``python jobs/predict.py --help`` (installed package: ``brainmt-predict-jobs``)."""

import sys

from brainmt.launch.predict_jobs import main

if __name__ == "__main__":
    sys.exit(main())
