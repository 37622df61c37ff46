"""Training and evaluation: ``brainmt.train.loop.train`` is the one entry point every launcher calls."""
