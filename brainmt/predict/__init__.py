"""``brainmt predict``: a trained run applied to new 4-D NIfTI scans, through the run's own preprocessing.

``scans.py`` reads a scan as the run's shards were made (grid, mask, z-scoring, background); ``core.py`` puts every
evaluation window through the checkpoint's model and appends each scan to a part file (``parts.py``); ``merge.py``
turns the part files into predictions, per-window outputs, the skipped scans and (with phenotypes) metrics;
``cli.py`` is the command. ``jobs/predict.py`` (``brainmt.launch.predict_jobs``) runs the parts as a job array.
"""

from brainmt.predict.cli import add_parser, main, run

__all__ = ["add_parser", "main", "run"]
