"""Ray Tune sweeps: search spaces over config keys, the trial trainable, ASHA, Ray inside a submitit job."""
