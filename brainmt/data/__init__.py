"""Data: synthetic scans now; NIfTI reading, shards and loaders follow."""
