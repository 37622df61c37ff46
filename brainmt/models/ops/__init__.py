"""Kernels: the selective scan and causal conv1d in pure PyTorch (``scan``, the reference and CPU path) and the
fused bidirectional Mamba op and add+RMSNorm on mamba-ssm's CUDA kernels (``fused``), each beside its
pure-PyTorch reference twin (``bimamba_inner_ref``, ``add_rms_norm_ref``)."""
