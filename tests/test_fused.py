"""The fused bidirectional Mamba op's bookkeeping on the CPU: layouts, end padding, time reversal, gradients.

The compiled kernels it calls (causal-conv1d and selective-scan, forward and backward) are replaced by
float64 emulations built on the pure-PyTorch references, so everything around them is checked exactly
against the unfused mixer; ``tests/test_gpu.py`` checks the real kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainmt.models.mamba import BiMambaMixer
from brainmt.models.ops import fused, scan


def _conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=weight.shape[0])[..., : x.shape[-1]]
    return F.silu(out) if silu else out


def _conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    with torch.enable_grad():
        grads = torch.autograd.grad(_conv_fwd(*inputs[:3], None, None, None, silu), inputs, dout)
    dx.copy_(grads[0])
    return dx, grads[1], grads[2], None


def _gated_scan(u, delta, A, B, C, D, z, delta_bias):
    return scan.selective_scan(u, delta, A, B.squeeze(1), C.squeeze(1), D, None, delta_bias, True) * F.silu(z)


class _Scan:
    """selective_scan_cuda's fwd/bwd entry points (4-D B and C, z, softplus), emulated."""

    @staticmethod
    def fwd(u, delta, A, B, C, D, z, delta_bias, softplus):
        out = scan.selective_scan(u, delta, A, B.squeeze(1), C.squeeze(1), D, None, delta_bias, softplus)
        return out, torch.zeros(1), out * F.silu(z)

    @staticmethod
    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, intermediates, out, dz, softplus, recompute_out_z):
        inputs = [t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            out_z = _gated_scan(*inputs)
            grads = torch.autograd.grad(out_z, inputs, dout)
        dz.copy_(grads[6])
        return (*grads[:6], grads[7], dz, out_z.detach())


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("batch, length", [(1, 13), (2, 13), (2, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_fused_op_matches_the_unfused_mixer(monkeypatch, multiple, batch, length, bidirectional):
    monkeypatch.setattr(fused, "_ops", lambda: {"conv_fwd": _conv_fwd, "conv_bwd": _conv_bwd, "scan": _Scan})
    monkeypatch.setattr(fused, "SEQ_MULTIPLE", multiple)
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4, backend="torch", chunk_size=4, bidirectional=bidirectional).double()
    hidden = torch.randn(batch, length, 16, dtype=torch.float64)
    grad_out = torch.randn(batch, length, 16, dtype=torch.float64)
    results = []
    for forward in (mixer, mixer._forward_fused):
        inp = hidden.clone().requires_grad_()
        out = forward(inp)
        out.backward(grad_out)
        results.append((out.detach(), inp.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}))
        mixer.zero_grad()
    (out_ref, in_ref, params_ref), (out_fused, in_fused, params_fused) = results
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(in_fused, in_ref, rtol=1e-12, atol=1e-12)
    assert params_fused.keys() == params_ref.keys()
    for name in params_ref:
        torch.testing.assert_close(params_fused[name], params_ref[name], rtol=1e-10, atol=1e-12, msg=name)
