"""The pure-PyTorch selective scan against a plain sequential recurrence, forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainmt.models.ops.scan import causal_conv1d, selective_scan


def sequential_recurrence(u, delta, A, B, C, D, z, delta_bias):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  out = y * silu(z)."""
    delta = F.softplus(delta + delta_bias[:, None])
    batch, dim, length = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype)
    outs = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        outs.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(outs, dim=-1) * F.silu(z)


def _inputs(batch, dim, n_state, length, seed):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    return [
        torch.randn(batch, dim, length, **f64),            # u
        torch.randn(batch, dim, length, **f64),            # delta (before bias and softplus)
        -torch.rand(dim, n_state, **f64) * 8 - 0.1,        # A
        torch.randn(batch, n_state, length, **f64),        # B
        torch.randn(batch, n_state, length, **f64),        # C
        torch.randn(dim, **f64),                           # D
        torch.randn(batch, dim, length, **f64),            # z
        torch.randn(dim, **f64),                           # delta_bias
    ]


@pytest.mark.parametrize("length, chunk_size", [(1, None), (9, None), (50, None), (50, 7), (64, 64), (130, 3)])
def test_matches_sequential_recurrence_float64(length, chunk_size):
    args = [a.requires_grad_() for a in _inputs(2, 6, 5, length, seed=length)]
    u, delta, A, B, C, D, z, bias = args
    ours = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, chunk_size=chunk_size)
    ref = sequential_recurrence(*args)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, args, grad_out)
    g_ref = torch.autograd.grad(ref, args, grad_out)
    for name, a, b in zip("u delta A B C D z delta_bias".split(), g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_long_decay_does_not_overflow():
    """Large delta * |A| over long chunks: every factor is a decay in [0, 1], so the result stays finite."""
    u, delta, A, B, C, D, z, bias = _inputs(1, 4, 3, 400, seed=1)
    out = selective_scan(u, delta * 0 + 20.0, A * 10, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                         chunk_size=200)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sequential_recurrence(u, delta * 0 + 20.0, A * 10, B, C, D, z, bias))


def test_low_precision_input_keeps_dtype_and_computes_in_float32():
    u, delta, A, B, C, D, z, bias = _inputs(1, 4, 3, 33, seed=2)
    out = selective_scan(u.bfloat16(), delta.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), D.float(),
                         z=z.bfloat16(), delta_bias=bias.float(), delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = sequential_recurrence(u.bfloat16().double(), delta.bfloat16().double(), A, B.bfloat16().double(),
                                C.bfloat16().double(), D, z.bfloat16().double(), bias)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_shape_mismatch_is_an_error():
    u, delta, A, B, C, *_ = _inputs(1, 4, 3, 10, seed=3)
    with pytest.raises(ValueError, match="shapes do not agree"):
        selective_scan(u, delta, A, B[:, :, :5], C)


def test_causal_conv1d_is_causal_and_depthwise():
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    out = causal_conv1d(x, w, b, activation="silu")
    padded = F.pad(x, (3, 0))
    ref = torch.stack([(padded[:, :, t:t + 4] * w).sum(-1) + b for t in range(12)], dim=-1)
    torch.testing.assert_close(out, F.silu(ref))
    with pytest.raises(ValueError, match="unknown activation"):
        causal_conv1d(x, w, b, activation="relu")
