"""Fused CUDA paths for the Mamba stage: one autograd op for the bidirectional mixer, fused add+RMSNorm.

:func:`bimamba_inner_fn` is mamba-ssm's ``MambaInnerFn`` extended to the Vision Mamba "v2" mixer:
both directions (each with its own causal conv, ``x_proj``, ``dt_proj``, A, D and Δ bias) read the
one ``in_proj`` output ``xz``, their gated outputs are averaged and go through the one ``out_proj``.
Only ``xz``, the small ``x_proj`` outputs and the scan outputs are kept for the backward pass; the
conv outputs, Δ and the gated outputs are recomputed there (cheap, memory-bound), so a block keeps
about a third of the activations of the unfused path and has no transposed or ``.contiguous()``
copies. :func:`add_rms_norm` is mamba-ssm's Triton ``residual + x -> RMSNorm`` with the residual
stream kept in float32. Both need mamba-ssm and causal-conv1d (imported lazily, on first use).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

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


# the scans run on the sequence padded at its end to a multiple of this: whole 2048-step chunks take the
# scan kernels' even-length path, and every (d, L) matrix gets an aligned leading dimension (with an odd L
# cuBLAS falls back to slow unaligned kernels). Padding after the last position is exact in both
# directions: each direction's padding comes after its last real step, and its outputs are dropped.
SEQ_MULTIPLE = 2048


def _padded_length(length: int) -> int:
    return -(-length // SEQ_MULTIPLE) * SEQ_MULTIPLE


def _to_scan_layout(t: torch.Tensor, padded: int, flip: bool) -> torch.Tensor:
    """(b, L, c) -> (b, c, padded) with L fastest, time-reversed if ``flip``, zeros after L (one copy kernel)."""
    batch, length, channels = t.shape
    out = t.new_empty(batch, channels, padded)
    out[..., length:].zero_()
    src = t.transpose(1, 2)
    out[..., :length].copy_(src.flip(-1) if flip else src)
    return out


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
    return conv_out, delta, x_dbl, B, C, out, intermediates, out_z


class BiMambaInnerFn(torch.autograd.Function):
    """Bidirectional Mamba mixer after ``in_proj``: xz (b, L, 2*d_inner) -> out_proj(mean of both directions) (b, L, d_model)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz: torch.Tensor, out_proj_w: torch.Tensor, *branch_params: torch.Tensor) -> torch.Tensor:
        """Run the directions (the second on the time-reversed sequence), average, project."""
        ops = _ops()
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else xz.dtype
        xz = xz.to(dtype)
        batch, length = xz.shape[:2]
        padded = _padded_length(length)
        n_branches = len(branch_params) // BRANCH_TENSORS
        saved: list[torch.Tensor] = []
        y = None  # (b, d, Lp): the directions' gated outputs summed over the first L positions
        for i in range(n_branches):
            conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias = branch_params[i * BRANCH_TENSORS:(i + 1) * BRANCH_TENSORS]
            params = (conv_w.squeeze(1), conv_b.contiguous(), x_proj_w.to(dtype), dt_proj_w.to(dtype),
                      A.contiguous(), D.contiguous(), dt_bias.contiguous())
            *_, x_dbl, B, C, out, intermediates, out_z = _branch_forward(_to_scan_layout(xz, padded, i > 0), params, ops)
            if y is None:
                y = out_z
            else:
                y[..., :length].add_(out_z[..., :length].flip(-1))
            saved += [*params, x_dbl, B, C, out, intermediates]
        y = y[..., :length].mul_(1.0 / n_branches)
        out_proj_w = out_proj_w.to(dtype)
        ctx.n_branches = n_branches
        ctx.save_for_backward(xz, out_proj_w, *saved)
        return F.linear(y.transpose(1, 2), out_proj_w)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Recompute conv outputs and Δ per direction, run the scans' and convs' backward, sum into dxz."""
        ops = _ops()
        xz, out_proj_w, *saved = ctx.saved_tensors
        per = BRANCH_TENSORS + 5
        scale = 1.0 / ctx.n_branches
        batch, length = xz.shape[:2]
        padded = _padded_length(length)
        dout = dout.reshape(batch, length, -1).to(xz.dtype)
        dy = (dout @ out_proj_w).mul_(scale)                                     # (b, L, d): each direction's share
        dxz = torch.empty_like(xz)
        y = None
        grads: list[torch.Tensor | None] = []
        for i in range(ctx.n_branches):
            conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, x_dbl, B, C, out, intermediates = saved[i * per:(i + 1) * per]
            rank = dt_proj_w.shape[1]
            xz_i = _to_scan_layout(xz, padded, i > 0)
            x, z = xz_i.chunk(2, dim=1)
            dxz_i = torch.empty_like(xz_i)
            dx, dz = dxz_i.chunk(2, dim=1)
            conv_out = ops["conv_fwd"](x, conv_w, conv_b, None, None, None, True)
            delta = (dt_proj_w @ x_dbl[:, :rank].t()).view(-1, batch, padded).transpose(0, 1)
            dy_i = _to_scan_layout(dy, padded, i > 0)
            dconv_out, ddelta, dA, dB, dC, dD, ddt_bias, dz, out_z = ops["scan"].bwd(
                conv_out, delta, A, B, C, D, z, dt_bias, dy_i, intermediates, out, dz, True, True)
            if y is None:
                y = out_z
            else:
                y[..., :length].add_(out_z[..., :length].flip(-1))
            dx_dbl = torch.empty_like(x_dbl)
            dx_dbl[:, rank:-B.shape[2]] = dB.squeeze(1).transpose(1, 2).reshape(-1, B.shape[2])
            dx_dbl[:, -C.shape[2]:] = dC.squeeze(1).transpose(1, 2).reshape(-1, C.shape[2])
            ddelta = ddelta.transpose(0, 1).reshape(ddelta.shape[1], -1)           # (d, b*Lp)
            ddt_proj_w = ddelta @ x_dbl[:, :rank]
            dx_dbl[:, :rank] = ddelta.t() @ dt_proj_w
            conv_2d = conv_out.transpose(1, 2).reshape(-1, conv_out.shape[1])     # (b*Lp, d)
            dx_proj_w = dx_dbl.t() @ conv_2d
            dconv_2d = dconv_out.transpose(0, 1).reshape(dconv_out.shape[1], -1)   # (d, b*Lp)
            dconv_2d = torch.addmm(dconv_2d, x_proj_w.t(), dx_dbl.t(), out=dconv_2d)
            dconv_out = dconv_2d.view(-1, batch, padded).transpose(0, 1)
            dx, dconv_w, dconv_b, *_ = ops["conv_bwd"](x, conv_w, conv_b, dconv_out, None, None, None, dx, False, True)
            back = dxz_i[..., :length].transpose(1, 2)                             # (b, L, 2d) view
            if i == 0:
                dxz.copy_(back)
            else:
                dxz.add_(back.flip(1))
            grads += [dconv_w.unsqueeze(1), dconv_b, dx_proj_w, ddt_proj_w, dA, dD, ddt_bias]
        y = y[..., :length].mul_(scale)
        dout_proj_w = dout.reshape(batch * length, -1).t() @ y.transpose(1, 2).reshape(batch * length, -1)
        return (dxz, dout_proj_w, *grads)


def bimamba_inner_fn(xz: torch.Tensor, out_proj_weight: torch.Tensor, branches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """xz (b, L, 2*d_inner) from ``in_proj`` and each direction's 7 tensors (see ``BRANCH_TENSORS``) -> (b, L, d_model)."""
    flat = [t for branch in branches for t in branch]
    return BiMambaInnerFn.apply(xz, out_proj_weight, *flat)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = hidden + residual (float32); returns (RMSNorm(residual') in hidden's dtype, residual')."""
    return _ops()["rms_norm_fn"](hidden, weight, None, residual=residual, eps=eps, prenorm=True, residual_in_fp32=True)
