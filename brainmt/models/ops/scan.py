"""Pure-PyTorch selective scan (Mamba's S6 recurrence): the CPU path and the reference for the CUDA kernels.

The recurrence, per batch b, channel d and state n::

    delta_t = softplus(dt_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t   = y_t * silu(z_t)                         (if z is given)

The scan is split into chunks of ``c`` steps. Inside a chunk the recurrence runs step by step but
for all chunks at once; a second, short loop carries the state from chunk to chunk. Every multiply
is by a decay in [0, 1], so nothing overflows, and both work and memory are O(L): with
``c = ceil(sqrt(L))`` the Python loops take about ``2 * sqrt(L)`` iterations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias (dim,).
    Returns (batch, dim, L) in u's dtype; the arithmetic runs in float32 (or float64 if u is).
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    batch, dim, length = u.shape
    n_state = A.shape[1]
    if delta.shape != u.shape or A.shape[0] != dim or B.shape != (batch, n_state, length) or C.shape != B.shape:
        raise ValueError(
            f"selective_scan: shapes do not agree: u {tuple(u.shape)}, delta {tuple(delta.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    u_c = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    c = chunk_size or max(1, math.ceil(math.sqrt(length)))
    n_chunks = math.ceil(length / c)
    pad = n_chunks * c - length
    # padding with delta = 0 leaves the state untouched (decay 1, input 0); padded outputs are dropped
    delta_p = F.pad(delta, (0, pad))
    u_p = F.pad(u_c, (0, pad))
    B_p = F.pad(B.to(compute), (0, pad))
    C_p = F.pad(C.to(compute), (0, pad))

    # step-major layout (c, batch, dim, n_chunks, N): each step of the loop below reads one contiguous slab
    delta_k = delta_p.view(batch, dim, n_chunks, c).permute(3, 0, 1, 2).unsqueeze(-1)
    decay = torch.exp(delta_k * A.to(compute)[None, None, :, None, :])
    B_k = B_p.view(batch, n_state, n_chunks, c).permute(3, 0, 2, 1).unsqueeze(2)  # (c, b, 1, k, N)
    u_k = u_p.view(batch, dim, n_chunks, c).permute(3, 0, 1, 2).unsqueeze(-1)
    drive = (delta_k * u_k) * B_k

    # 1. inside each chunk, from a zero state: states and running products of the decays
    # unbind, not indexing: the backward of one unbind is one stack, of c indexings c full-size adds
    decay_steps, drive_steps = decay.unbind(0), drive.unbind(0)
    state, running = drive_steps[0], decay_steps[0]
    states, products = [state], [running]
    for t in range(1, c):
        state = decay_steps[t] * state + drive_steps[t]
        running = running * decay_steps[t]
        states.append(state)
        products.append(running)
    h_local = torch.stack(states, dim=3)  # (b, d, k, c, N)
    decay_prod = torch.stack(products, dim=3)

    # 2. the state entering each chunk
    carry = torch.zeros(batch, dim, n_state, dtype=compute, device=u.device)
    carries = []
    chunk_decays, chunk_ends = decay_prod[:, :, :, -1].unbind(2), h_local[:, :, :, -1].unbind(2)
    for k in range(n_chunks):
        carries.append(carry)
        carry = chunk_decays[k] * carry + chunk_ends[k]
    carry_in = torch.stack(carries, dim=2)  # (b, d, k, N)

    h = h_local + decay_prod * carry_in[:, :, :, None, :]
    C_k = C_p.view(batch, n_state, n_chunks, c)
    y = torch.einsum("bdkcn,bnkc->bdkc", h, C_k).reshape(batch, dim, n_chunks * c)[:, :, :length]
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Depthwise causal 1-D convolution with causal-conv1d's signature: x (batch, dim, L), weight (dim, width)."""
    dim, width = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}")
    return out
