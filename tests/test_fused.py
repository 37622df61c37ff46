"""The fused bidirectional Mamba op and add+RMSNorm against their pure-PyTorch reference twins.

On the CPU: the reference twins (``bimamba_inner_ref``, ``add_rms_norm_ref``) against the unfused mixer and
plain RMSNorm, and the fused op's bookkeeping (layouts, end padding, time reversal, gradients) with the
compiled kernels it calls (causal-conv1d and selective-scan, forward and backward) replaced by float64
emulations built on the pure-PyTorch references. On a GPU with mamba-ssm (``pytest -m gpu
tests/test_fused.py``): the real fused ops against their twins; ``tests/test_gpu.py`` checks the whole model.
Tolerances on the GPU are relative Frobenius errors ||a - b|| / ||b||.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from brainmt.models.layers import MambaBlock
from brainmt.models.mamba import BiMambaMixer
from brainmt.models.ops import fused, scan

GPU = pytest.mark.gpu
NEEDS_KERNELS = pytest.mark.skipif(not torch.cuda.is_available() or not fused.fused_available(),
                                   reason="needs a CUDA GPU with mamba-ssm and causal-conv1d")


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


# ---- the reference twins ----


def _op_args(mixer: BiMambaMixer) -> tuple:
    """The arguments the mixer's fused path passes to the op (as ``BiMambaMixer._forward_fused`` builds them)."""
    branches = [b for b in (mixer.forward_branch, mixer.backward_branch) if b is not None]
    tensors = [(b.conv1d.weight, b.conv1d.bias, b.x_proj.weight, b.dt_proj.weight, -torch.exp(b.A_log.float()),
                b.D.float(), b.dt_proj.bias.float()) for b in branches]
    return mixer.in_proj.weight, mixer.out_proj.weight, tensors


def _forward_backward(forward, mixer: BiMambaMixer, hidden: torch.Tensor, grad_out: torch.Tensor) -> tuple:
    """Output, input gradient and parameter gradients of ``forward(hidden)``."""
    mixer.zero_grad()
    inp = hidden.clone().requires_grad_()
    out = forward(inp)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), inp.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}


def _mixer(dtype: torch.dtype, bidirectional: bool, chunk_size: int | None) -> BiMambaMixer:
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4, backend="torch", chunk_size=chunk_size, bidirectional=bidirectional)
    with torch.no_grad():  # D away from its init of ones, so that a D mixed up between directions shows
        for name, p in mixer.named_parameters():
            if name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    return mixer.to(dtype)


@pytest.mark.parametrize("through_mixer", [False, True])
@pytest.mark.parametrize("batch, length", [(1, 13), (2, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_reference_matches_the_unfused_mixer(dtype, tol, bidirectional, batch, length, through_mixer):
    """bimamba_inner_ref on a mixer's own weights = the mixer's unfused CPU forward, output and gradients."""
    mixer = _mixer(dtype, bidirectional, chunk_size=None if dtype == torch.float32 else 4)
    hidden = torch.randn(batch, length, 16, dtype=dtype)
    grad_out = torch.randn(batch, length, 16, dtype=dtype)
    assert not mixer.uses_fused(hidden.device)
    out_ref, in_ref, params_ref = _forward_backward(mixer, mixer, hidden, grad_out)
    if through_mixer:  # the mixer's fused path, with the reference in place of the CUDA op
        with mock.patch.object(fused, "bimamba_inner_fn", fused.bimamba_inner_ref):
            out, in_grad, params = _forward_backward(mixer._forward_fused, mixer, hidden, grad_out)
    else:
        out, in_grad, params = _forward_backward(lambda h: fused.bimamba_inner_ref(h, *_op_args(mixer)),
                                                 mixer, hidden, grad_out)
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(in_grad, in_ref, rtol=tol, atol=tol)
    assert params.keys() == params_ref.keys()
    for name in params_ref:
        torch.testing.assert_close(params[name], params_ref[name], rtol=100 * tol, atol=tol, msg=name)


def test_reference_under_autocast_keeps_the_fused_dtypes():
    """Under (CPU) bf16 autocast the reference returns bf16, close to the float32 result; gradients stay float32."""
    mixer = _mixer(torch.float32, True, chunk_size=None)
    hidden, grad_out = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    out_ref, in_ref, _ = _forward_backward(mixer, mixer, hidden, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, in_grad, params = _forward_backward(lambda h: fused.bimamba_inner_ref(h, *_op_args(mixer)),
                                                 mixer, hidden, grad_out)
    assert out.dtype == torch.bfloat16 and in_grad.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in params.values())
    assert ((out.float() - out_ref).norm() / out_ref.norm()).item() < 3e-2
    assert ((in_grad - in_ref).norm() / in_ref.norm()).item() < 3e-2


def test_reference_rejects_malformed_directions():
    mixer = _mixer(torch.float32, True, chunk_size=None)
    in_w, out_w, branches = _op_args(mixer)
    with pytest.raises(ValueError, match="at least one"):
        fused.bimamba_inner_ref(torch.randn(1, 4, 16), in_w, out_w, [])
    with pytest.raises(ValueError, match="7 tensors"):
        fused.bimamba_inner_ref(torch.randn(1, 4, 16), in_w, out_w, [branches[0][:6]])


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_ref_is_add_then_rms_norm(with_residual):
    """In float64: (rms_norm(hidden + residual) * weight, hidden + residual), with the same gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) if with_residual else None
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    inputs = [t for t in (hidden, residual, weight) if t is not None]
    g_norm, g_sum = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    normed, summed = fused.add_rms_norm_ref(hidden, residual, weight, 1e-5)
    grads = torch.autograd.grad((normed * g_norm).sum() + (summed * g_sum).sum(), inputs)
    plain_sum = hidden + residual if with_residual else hidden
    plain = F.rms_norm(plain_sum, (8,), weight, eps=1e-5)
    plain_grads = torch.autograd.grad((plain * g_norm).sum() + (plain_sum * g_sum).sum(), inputs)
    assert normed.dtype == summed.dtype == torch.float64
    torch.testing.assert_close(normed, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(summed, plain_sum, rtol=0, atol=0)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_add_rms_norm_ref_keeps_the_kernels_dtypes():
    """bf16 hidden: the norm in float32 returned as bf16; the residual stream float32 (or the residual's dtype)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 8).bfloat16(), torch.rand(8) + 0.5
    normed, summed = fused.add_rms_norm_ref(hidden, None, weight, 1e-5)
    assert normed.dtype == torch.bfloat16 and summed.dtype == torch.float32
    torch.testing.assert_close(normed, F.rms_norm(hidden.float(), (8,), weight, eps=1e-5).bfloat16())
    residual = torch.randn(3, 8)
    normed, summed = fused.add_rms_norm_ref(hidden, residual, weight, 1e-5)
    assert normed.dtype == torch.bfloat16 and summed.dtype == torch.float32
    torch.testing.assert_close(summed, hidden.float() + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(hidden.float() + residual, (8,), weight, eps=1e-5).bfloat16())


@pytest.mark.parametrize("layer_scale", [0.0, 0.1])
def test_blocks_on_the_split_stream_with_the_reference_norm_match_the_plain_blocks(layer_scale):
    """MambaBlock.forward_fused chained as BrainMT chains it (hidden, residual), with add_rms_norm_ref: = forward."""
    torch.manual_seed(0)
    blocks = [MambaBlock(16, 0.0, layer_scale, d_state=4, backend="torch").double() for _ in range(3)]
    for blk in blocks:
        torch.nn.init.uniform_(blk.norm.weight, 0.5, 1.5)
        if layer_scale:
            torch.nn.init.uniform_(blk.ls.gamma, 0.05, 0.2)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    plain = x
    for blk in blocks:
        plain = blk(plain)
    hidden, residual = x, None
    with mock.patch.object(fused, "add_rms_norm", fused.add_rms_norm_ref):
        for blk in blocks:
            hidden, residual = blk.forward_fused(hidden, residual)
    torch.testing.assert_close(residual + hidden, plain, rtol=1e-12, atol=1e-12)


# ---- on a GPU with mamba-ssm: the fused ops against their twins ----


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@contextlib.contextmanager
def _full_precision_fp32():
    """No TF32 in fp32 matrix products and convolutions (the reference's F.conv1d and F.linear) while inside."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@GPU
@NEEDS_KERNELS
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("batch, length", [(2, 2049), (1, 300)])
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_fused_op_matches_its_reference(precision, tol, batch, length, bidirectional):
    """bimamba_inner_fn vs bimamba_inner_ref on the same weights: output, input and every parameter gradient."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(256, d_state=16, backend="cuda", fused=True, bidirectional=bidirectional).cuda()
    assert mixer.uses_fused(torch.device("cuda"))
    hidden = torch.randn(batch, length, 256, device="cuda")
    grad_out = torch.randn(batch, length, 256, device="cuda") / (batch * length * 256) ** 0.5
    results = {}
    with _full_precision_fp32():
        for name, op in (("fused", fused.bimamba_inner_fn), ("ref", fused.bimamba_inner_ref)):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                results[name] = _forward_backward(lambda h, op=op: op(h, *_op_args(mixer)), mixer, hidden, grad_out)
    (out_f, in_f, params_f), (out_r, in_r, params_r) = results["fused"], results["ref"]
    assert out_f.dtype == out_r.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    errs = {"output": _rel(out_f, out_r), "input grad": _rel(in_f, in_r)}
    errs.update({n: _rel(params_f[n], params_r[n]) for n in params_r})
    worst = max(errs, key=errs.get)
    print(f"\n[{precision}, b={batch}, L={length}, {'bi' if bidirectional else 'uni'}] fused vs reference: "
          f"output {errs['output']:.2e}, input grad {errs['input grad']:.2e}, worst {worst} {errs[worst]:.2e} "
          f"(tolerance {tol:.0e})")
    assert errs[worst] < tol, errs


@GPU
@NEEDS_KERNELS
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_add_rms_norm_matches_its_reference(dtype, tol, with_residual):
    """mamba-ssm's Triton add+RMSNorm vs add_rms_norm_ref: both outputs, their dtypes, and the gradients."""
    torch.manual_seed(0)
    hidden0 = torch.randn(2, 2049, 512, device="cuda").to(dtype)
    residual0 = torch.randn(2, 2049, 512, device="cuda") if with_residual else None
    weight0 = torch.rand(512, device="cuda") + 0.5
    g_norm, g_sum = torch.randn(2, 2049, 512, device="cuda"), torch.randn(2, 2049, 512, device="cuda")
    results = {}
    for name, op in (("fused", fused.add_rms_norm), ("ref", fused.add_rms_norm_ref)):
        inputs = [t.clone().requires_grad_() for t in (hidden0, residual0, weight0) if t is not None]
        hidden, weight = inputs[0], inputs[-1]
        normed, summed = op(hidden, inputs[1] if with_residual else None, weight, 1e-5)
        loss = (normed.float() * g_norm).sum() + (summed.float() * g_sum).sum()
        results[name] = (normed.detach(), summed.detach(), torch.autograd.grad(loss, inputs))
    (n_f, s_f, g_f), (n_r, s_r, g_r) = results["fused"], results["ref"]
    assert (n_f.dtype, s_f.dtype) == (n_r.dtype, s_r.dtype) == (dtype, torch.float32)
    errs = [_rel(n_f, n_r), _rel(s_f, s_r), *(_rel(a, b) for a, b in zip(g_f, g_r, strict=True))]
    print(f"\n[{dtype}, residual={with_residual}] add+RMSNorm vs reference: {[f'{e:.1e}' for e in errs]}")
    assert max(errs) < tol, errs
