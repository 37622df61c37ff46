"""Integrated Gradients for trained BrainMT runs: per-subject brain maps, group maps, region tables, figures.

``brainmt analyze --run DIR`` (one process) and ``python jobs/analyze.py --run DIR`` (a job array over
subjects plus a merge job) both call :mod:`brainmt.analysis.pipeline`. captum, matplotlib and nilearn
(brain figures over the MNI template, named atlases: :mod:`brainmt.analysis.atlases`) are imported where
they are used.
"""
