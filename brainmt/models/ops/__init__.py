"""Kernels: the selective scan and causal conv1d in pure PyTorch (``scan``, the reference and CPU path) and the
fused bidirectional Mamba op on mamba-ssm's CUDA kernels (``fused``; its reference is the unfused module path)."""
