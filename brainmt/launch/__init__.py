"""Launching brainmt jobs through submitit: executors from the cluster config, the training task (what each task
of a training job runs), sharding jobs, container runs (words: :mod:`brainmt.launch.job`)."""
