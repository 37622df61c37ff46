"""Fused CUDA paths for the Mamba stage: one autograd op for the bidirectional mixer, fused add+RMSNorm.

:func:`bimamba_inner_fn` is mamba-ssm's ``MambaInnerFn`` extended to the Vision Mamba "v2" mixer:
``in_proj``, then per direction (each with its own causal conv, ``x_proj``, ``dt_proj``, A, D and Δ
bias) the selective scan, then ``out_proj``, with the two directions averaged. Each direction runs on
its own copy of the (time-reversed for the second) normalised input, padded at its end to a multiple
of 2048 steps, and ``in_proj`` writes its output straight into the (d, L) layout the kernels read:
no transposed copies, aligned matrix products, and the scan kernels' even-length path. Only the
block's input, the small ``x_proj`` outputs and the scan outputs are kept for the backward pass; the
``in_proj`` output, conv outputs, Δ and gated outputs are recomputed there. :func:`add_rms_norm` is
mamba-ssm's Triton ``residual + x -> RMSNorm`` with the residual stream kept in float32. Both need
mamba-ssm and causal-conv1d (imported lazily, on first use).

Each has a pure-PyTorch reference twin here, as mamba-ssm keeps ``selective_scan_ref`` beside
``selective_scan_fn``: :func:`bimamba_inner_ref` and :func:`add_rms_norm_ref` take the same arguments and
compute the same function in the same dtypes, on any device and without mamba-ssm (plain autograd: no end
padding, no recomputation). Without autocast the first is the unfused mixer's arithmetic op for op (bit-equal
in float32); under autocast it keeps the kernels' precision (the causal conv in float32).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from brainmt.models.ops import scan

BRANCH_TENSORS = 7  # conv weight (d, 1, w), conv bias, x_proj weight, dt_proj weight, A (fp32), D, dt bias


@functools.lru_cache(maxsize=1)
def _ops() -> dict[str, Any]:
    """The compiled entry points (imported once): causal-conv1d fwd/bwd, selective-scan fwd/bwd, Triton RMSNorm."""
    import selective_scan_cuda
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    return {"conv_fwd": causal_conv1d_fwd_function, "conv_bwd": causal_conv1d_bwd_function,
            "scan": selective_scan_cuda, "rms_norm_fn": rms_norm_fn}


def fused_available() -> bool:
    """True when the fused ops import (mamba-ssm with its Triton kernels and causal-conv1d)."""
    try:
        _ops()
    except Exception:  # ImportError, or a compiled module built for another torch
        return False
    return True


# each direction runs on its sequence padded at its end to a multiple of this: whole 2048-step chunks take
# the scan kernels' even-length path (1.6x faster backward at T = 200), every (d, L) matrix gets an aligned
# leading dimension (with an odd L cuBLAS falls back to slow unaligned kernels), and causal-conv1d's
# backward avoids a length it gets slightly wrong (L = 2049: 3e-3 error in fp32). Padding after a
# direction's last step is exact: nothing real comes after it, and its outputs are dropped.
SEQ_MULTIPLE = 2048


def _padded_length(length: int) -> int:
    return -(-length // SEQ_MULTIPLE) * SEQ_MULTIPLE


def _pad_time(t: torch.Tensor, padded: int, flip: bool) -> torch.Tensor:
    """(b, L, c) -> (b, padded, c): time-reversed if ``flip``, zeros after L."""
    out = t.new_empty(t.shape[0], padded, t.shape[2])
    out[:, t.shape[1]:].zero_()
    out[:, :t.shape[1]].copy_(t.flip(1) if flip else t)
    return out


def _unpad_time(t: torch.Tensor, length: int, flip: bool) -> torch.Tensor:
    """(b, padded, c) -> (b, L, c): the real steps, back in forward time order."""
    return t[:, :length].flip(1) if flip else t[:, :length]


def _project_in(hidden_p: torch.Tensor, in_proj_w: torch.Tensor) -> torch.Tensor:
    """in_proj written straight into the kernels' layout: (b, Lp, e) -> xz (b, 2*d_inner, Lp), Lp fastest."""
    batch, padded, _ = hidden_p.shape
    return (in_proj_w @ hidden_p.reshape(batch * padded, -1).t()).view(-1, batch, padded).transpose(0, 1)


def _branch_forward(xz: torch.Tensor, params: tuple[torch.Tensor, ...], ops: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """One direction on xz (b, 2*d_inner, Lp): conv -> x_proj -> dt_proj -> selective scan."""
    conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias = params
    batch, length, rank, n_state = xz.shape[0], xz.shape[-1], dt_proj_w.shape[1], A.shape[1]
    x, z = xz.chunk(2, dim=1)
    conv_out = ops["conv_fwd"](x, conv_w, conv_b, None, None, None, True)
    x_dbl = F.linear(conv_out.transpose(1, 2).reshape(-1, conv_out.shape[1]), x_proj_w)   # (b*l, rank + 2N)
    delta = (dt_proj_w @ x_dbl[:, :rank].t()).view(-1, batch, length).transpose(0, 1)     # (b, d, l), l fastest
    B = x_dbl[:, rank:rank + n_state].reshape(batch, length, n_state).transpose(1, 2).unsqueeze(1).contiguous()
    C = x_dbl[:, -n_state:].reshape(batch, length, n_state).transpose(1, 2).unsqueeze(1).contiguous()
    out, intermediates, out_z = ops["scan"].fwd(conv_out, delta, A, B, C, D, z, dt_bias, True)
    return x_dbl, B, C, out, intermediates, out_z


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(b, d, Lp) with Lp fastest -> the (b*Lp, d) matrix (a view when b = 1)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


class BiMambaInnerFn(torch.autograd.Function):
    """Bidirectional Mamba mixer: hidden (b, L, d_model) -> out_proj(mean of both directions) (b, L, d_model)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: torch.Tensor, in_proj_w: torch.Tensor, out_proj_w: torch.Tensor,
                *branch_params: torch.Tensor) -> torch.Tensor:
        """Run the directions (the second on the time-reversed sequence), average, project."""
        ops = _ops()
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
        hidden, in_proj_w, out_proj_w = hidden.to(dtype), in_proj_w.to(dtype), out_proj_w.to(dtype)
        length = hidden.shape[1]
        padded = _padded_length(length)
        n_branches = len(branch_params) // BRANCH_TENSORS
        saved: list[torch.Tensor] = []
        out = None
        for i in range(n_branches):
            conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias = branch_params[i * BRANCH_TENSORS:(i + 1) * BRANCH_TENSORS]
            params = (conv_w.squeeze(1), conv_b.contiguous(), x_proj_w.to(dtype), dt_proj_w.to(dtype),
                      A.contiguous(), D.contiguous(), dt_bias.contiguous())
            xz = _project_in(_pad_time(hidden, padded, i > 0), in_proj_w)
            x_dbl, B, C, scan_out, intermediates, out_z = _branch_forward(xz, params, ops)
            projected = _unpad_time((_rows(out_z) @ out_proj_w.t()).view(hidden.shape[0], padded, -1), length, i > 0)
            out = projected if out is None else out.add_(projected)
            saved += [*params, x_dbl, B, C, scan_out, intermediates]
        ctx.n_branches = n_branches
        ctx.save_for_backward(hidden, in_proj_w, out_proj_w, *saved)
        return out.mul_(1.0 / n_branches)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Per direction: recompute in_proj, conv and Δ, run the scan's and conv's backward, then the projections'."""
        ops = _ops()
        hidden, in_proj_w, out_proj_w, *saved = ctx.saved_tensors
        per = BRANCH_TENSORS + 5
        batch, length = hidden.shape[:2]
        padded = _padded_length(length)
        dout = dout.to(hidden.dtype) * (1.0 / ctx.n_branches)          # each direction's share
        dhidden = None
        din_w = dout_w = None
        acc = torch.promote_types(hidden.dtype, torch.float32)           # weight gradients summed over directions in fp32
        grads: list[torch.Tensor | None] = []
        for i in range(ctx.n_branches):
            conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, x_dbl, B, C, scan_out, inter = saved[i * per:(i + 1) * per]
            rank = dt_proj_w.shape[1]
            hidden_p = _pad_time(hidden, padded, i > 0)
            xz = _project_in(hidden_p, in_proj_w)
            x, z = xz.chunk(2, dim=1)
            dxz = torch.empty_like(xz)
            dx, dz = dxz.chunk(2, dim=1)
            conv_out = ops["conv_fwd"](x, conv_w, conv_b, None, None, None, True)
            delta = (dt_proj_w @ x_dbl[:, :rank].t()).view(-1, batch, padded).transpose(0, 1)
            dout_p = _pad_time(dout, padded, i > 0).reshape(batch * padded, -1)            # (b*Lp, e)
            dy = (out_proj_w.t() @ dout_p.t()).view(-1, batch, padded).transpose(0, 1)     # (b, d, Lp), Lp fastest
            dconv_out, ddelta, dA, dB, dC, dD, ddt_bias, dz, out_z = ops["scan"].bwd(
                conv_out, delta, A, B, C, D, z, dt_bias, dy, inter, scan_out, dz, True, True)
            dx_dbl = torch.empty_like(x_dbl)
            dx_dbl[:, rank:-B.shape[2]] = dB.squeeze(1).transpose(1, 2).reshape(-1, B.shape[2])
            dx_dbl[:, -C.shape[2]:] = dC.squeeze(1).transpose(1, 2).reshape(-1, C.shape[2])
            ddelta = ddelta.transpose(0, 1).reshape(ddelta.shape[1], -1)           # (d, b*Lp)
            ddt_proj_w = ddelta @ x_dbl[:, :rank]
            dx_dbl[:, :rank] = ddelta.t() @ dt_proj_w
            dx_proj_w = dx_dbl.t() @ _rows(conv_out)
            dconv_2d = dconv_out.transpose(0, 1).reshape(dconv_out.shape[1], -1)   # (d, b*Lp)
            dconv_2d = torch.addmm(dconv_2d, x_proj_w.t(), dx_dbl.t(), out=dconv_2d)
            dconv_out = dconv_2d.view(-1, batch, padded).transpose(0, 1)
            dx, dconv_w, dconv_b, *_ = ops["conv_bwd"](x, conv_w, conv_b, dconv_out, None, None, None, dx, False, True)
            dxz_2d = dxz.transpose(0, 1).reshape(dxz.shape[1], -1)                 # (2d, b*Lp)
            dh = _unpad_time((dxz_2d.t() @ in_proj_w).view(batch, padded, -1), length, i > 0)
            dhidden = dh if dhidden is None else dhidden.add_(dh)
            din = (dxz_2d @ hidden_p.reshape(batch * padded, -1)).to(acc)
            dout_w_i = (dout_p.t() @ _rows(out_z)).to(acc)
            din_w = din if din_w is None else din_w.add_(din)
            dout_w = dout_w_i if dout_w is None else dout_w.add_(dout_w_i)
            grads += [dconv_w.unsqueeze(1), dconv_b, dx_proj_w, ddt_proj_w, dA, dD, ddt_bias]
        return (dhidden, din_w, dout_w, *grads)


def bimamba_inner_fn(hidden: torch.Tensor, in_proj_weight: torch.Tensor, out_proj_weight: torch.Tensor,
                     branches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """hidden (b, L, d_model), the projections and each direction's 7 tensors (``BRANCH_TENSORS``) -> (b, L, d_model)."""
    flat = [t for branch in branches for t in branch]
    return BiMambaInnerFn.apply(hidden, in_proj_weight, out_proj_weight, *flat)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = hidden + residual (float32); returns (RMSNorm(residual') in hidden's dtype, residual')."""
    return _ops()["rms_norm_fn"](hidden, weight, None, residual=residual, eps=eps, prenorm=True, residual_in_fp32=True)


# ---- pure-PyTorch reference twins: the same arguments and results, on any device, without mamba-ssm ----


def _causal_conv_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv1d) of x (b, d, L), weight (d, 1, w): float32 or wider arithmetic, x's dtype out."""
    compute = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)  # as causal-conv1d
    width = weight.shape[-1]
    out = F.conv1d(x.to(compute), weight.to(compute), bias.to(compute), padding=width - 1, groups=x.shape[1])
    return F.silu(out[..., : x.shape[-1]]).to(x.dtype)


def _branch_ref(x: torch.Tensor, z: torch.Tensor, params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """One direction on x, z (b, d_inner, L): causal conv -> x_proj -> dt_proj -> gated selective scan."""
    if len(params) != BRANCH_TENSORS:
        raise ValueError(f"each direction takes {BRANCH_TENSORS} tensors, got {len(params)}")
    conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias = params
    rank, n_state = dt_proj_w.shape[1], A.shape[1]
    x = _causal_conv_silu_ref(x, conv_w, conv_b)
    x_dbl = F.linear(x.transpose(1, 2), x_proj_w.to(dtype))                      # (b, L, rank + 2N)
    dt, B, C = torch.split(x_dbl, [rank, n_state, n_state], dim=-1)
    delta = F.linear(dt, dt_proj_w.to(dtype)).transpose(1, 2)                     # Δ bias added in the scan
    return scan.selective_scan(x.contiguous(), delta.contiguous(), A, B.transpose(1, 2).contiguous(),
                               C.transpose(1, 2).contiguous(), D, z=z.contiguous(), delta_bias=dt_bias,
                               delta_softplus=True)


def bimamba_inner_ref(hidden: torch.Tensor, in_proj_weight: torch.Tensor, out_proj_weight: torch.Tensor,
                      branches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`bimamba_inner_fn`: the same arguments and result, any device, plain autograd."""
    if not branches:
        raise ValueError("bimamba_inner_ref needs at least one direction")
    device = hidden.device.type
    # the fused op's precision: autocast's dtype (or hidden's) for the projections and the scan's inputs and
    # outputs; the conv and the scan's recurrence in float32
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        xz = F.linear(hidden.to(dtype), in_proj_weight.to(dtype)).transpose(1, 2)    # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        out = _branch_ref(x, z, branches[0], dtype)
        for params in branches[1:]:  # every later direction scans the time-reversed sequence
            out = out + _branch_ref(x.flip(-1), z.flip(-1), params, dtype).flip(-1)
        if len(branches) > 1:
            out = (1.0 / len(branches)) * out
        return F.linear(out.transpose(1, 2), out_proj_weight.to(dtype))


def add_rms_norm_ref(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch twin of :func:`add_rms_norm`: (RMSNorm(hidden + residual) in hidden's dtype, the sum)."""
    # as mamba-ssm's kernel: the sum and the norm in float32 (float64 inputs stay float64); the sum is returned
    # in residual's dtype, float32 (or wider) when there is no residual yet
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    if residual is not None:
        compute = torch.promote_types(compute, residual.dtype)
    summed = hidden.to(compute) if residual is None else hidden.to(compute) + residual.to(compute)
    normed = summed * torch.rsqrt(summed.square().mean(-1, keepdim=True) + eps) * weight.to(compute)
    residual_dtype = torch.promote_types(hidden.dtype, torch.float32) if residual is None else residual.dtype
    return normed.to(hidden.dtype), summed.to(residual_dtype)
