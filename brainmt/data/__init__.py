"""Data: NIfTI scans and phenotypes into WebDataset shards (``shards``), the loader, synthetic scans."""
