"""brainmt: raw resting-state fMRI to trained BrainMT models and brain maps on a GPU cluster."""

__version__ = "0.1.0"
