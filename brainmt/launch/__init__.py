"""Launching brainmt jobs through submitit: executors from the cluster config, the checkpointable job."""
