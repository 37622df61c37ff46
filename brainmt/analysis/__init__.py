"""Integrated Gradients for trained BrainMT runs: per-subject brain maps, group maps, region tables, figures.

``brainmt analyze --run DIR`` (one process) and ``python jobs/analyze.py --run DIR`` (a job array over
subjects plus a merge job) both call :mod:`brainmt.analysis.pipeline`. captum and matplotlib are
imported where they are used.
"""
