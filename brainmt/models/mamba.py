"""Bidirectional Mamba mixer (Vision Mamba "v2": shared in/out projections, one S6 branch per direction).

The kernel backend is resolved once per mixer call path by :func:`get_kernels`: mamba-ssm's CUDA
kernels (``selective_scan_fn`` and ``causal_conv1d_fn``) when they are installed and the input is on
CUDA, otherwise the pure-PyTorch twins in :mod:`brainmt.models.ops.scan`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from brainmt.config import ModelConfig, config_choices
from brainmt.models.ops import fused, scan

BACKENDS = tuple(config_choices(ModelConfig, "backend"))   # model.backend's values


class Kernels(NamedTuple):
    """The two kernels a Mamba branch needs, with mamba-ssm's call signatures."""

    name: str
    selective_scan: Callable[..., torch.Tensor]
    causal_conv1d: Callable[..., torch.Tensor]


TORCH_KERNELS = Kernels("torch", scan.selective_scan, scan.causal_conv1d)


def _shape_only_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                     delta_softplus: bool = False, **_: object) -> torch.Tensor:
    """The scan's shapes and inputs without its recurrence (elementwise only): the meta-device stand-in."""
    out = u * delta + (B * C).sum(1, keepdim=True) * A.sum(1)[:, None]
    if delta_bias is not None:
        out = out + delta_bias[:, None]
    if D is not None:
        out = out + D[:, None] * u
    return out * F.silu(z) if z is not None else out


# on the meta device (shape checks, FLOP counting) the scan is a stand-in that counts no FLOPs;
# brainmt.bench.model adds the scan's FLOPs analytically
META_KERNELS = Kernels("meta", _shape_only_scan, scan.causal_conv1d)


@functools.lru_cache(maxsize=1)
def _load_cuda_kernels() -> Kernels | str:
    """Import mamba-ssm and causal-conv1d once; return the kernels or the reason they are unusable."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or an undefined CUDA symbol in a mismatched build
        return f"{type(exc).__name__}: {exc}"
    return Kernels("cuda", selective_scan_fn, causal_conv1d_fn)


def cuda_kernels_available() -> bool:
    """True when mamba-ssm's and causal-conv1d's compiled kernels import."""
    return isinstance(_load_cuda_kernels(), Kernels)


def check_backend(backend: str) -> None:
    """Fail early, with the fix, when ``backend`` is unknown or names CUDA kernels that are not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        loaded = _load_cuda_kernels()
        if not isinstance(loaded, Kernels):
            raise ImportError(
                "model.backend=cuda needs the compiled mamba-ssm and causal-conv1d kernels, which did not "
                f"import ({loaded}). Install them on a CUDA machine with `pip install 'brainmt[gpu]'` "
                "(or use the Apptainer image), or set model.backend=auto / torch for the pure-PyTorch scan."
            )


def get_kernels(backend: str, device: torch.device) -> Kernels:
    """The kernels for ``backend`` ("auto" | "cuda" | "torch") on ``device``."""
    if device.type == "meta":
        return META_KERNELS
    if backend == "torch":
        return TORCH_KERNELS
    loaded = _load_cuda_kernels()
    if backend == "cuda":
        check_backend(backend)
        if device.type != "cuda":
            raise RuntimeError(f"model.backend=cuda but the input is on {device}; move the model to a GPU")
        return loaded  # type: ignore[return-value]
    if device.type == "cuda" and isinstance(loaded, Kernels):
        return loaded
    return TORCH_KERNELS


class SSMBranch(nn.Module):
    """One direction's private parameters: causal conv, x/dt projections, A (as log) and D."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 dt_min: float, dt_max: float, dt_init_floor: float = 1e-4, dt_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.dt_rank, self.d_state = dt_rank, d_state
        # Mamba's initialisation: dt = softplus(bias) log-uniform in [dt_min, dt_max]; never re-initialised
        std = dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        for p in (self.dt_proj.bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, z: torch.Tensor, kernels: Kernels, chunk_size: int | None) -> torch.Tensor:
        """x, z: (batch, d_inner, L) -> gated scan output (batch, d_inner, L)."""
        batch, _, length = x.shape
        x = kernels.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan, in fp32
        B = B.transpose(1, 2).contiguous()
        C = C.transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log.float())
        kwargs = {"chunk_size": chunk_size} if kernels.name == "torch" else {}
        return kernels.selective_scan(
            x.contiguous(), dt.contiguous(), A, B, C, self.D.float(), z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, **kwargs,
        )


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer: (batch, L, d_model) -> (batch, L, d_model).

    The forward branch scans positions 0..L-1, the backward branch L-1..0, each with its own conv,
    x_proj, dt_proj, A and D; the two outputs are averaged before the shared output projection.
    With ``bidirectional=False`` it is a plain (causal) Mamba mixer. With ``fused=True`` and the CUDA
    kernels, both directions run as one autograd op (:func:`brainmt.models.ops.fused.bimamba_inner_fn`):
    the same arithmetic, a third of the saved activations, no transposed copies.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 bidirectional: bool = True, backend: str = "auto", chunk_size: int | None = None,
                 fused: bool = False) -> None:
        super().__init__()
        check_backend(backend)
        self.fused = fused
        self.d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.backend, self.chunk_size, self.bidirectional = backend, chunk_size, bidirectional
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.forward_branch = SSMBranch(self.d_inner, d_state, d_conv, dt_rank, dt_min, dt_max)
        self.backward_branch = (
            SSMBranch(self.d_inner, d_state, d_conv, dt_rank, dt_min, dt_max) if bidirectional else None
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, L, d_model) -> (batch, L, d_model)."""
        kernels = get_kernels(self.backend, hidden.device)
        if self.uses_fused(hidden.device):
            return self._forward_fused(hidden)
        xz = self.in_proj(hidden).transpose(1, 2)  # (batch, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        out = self.forward_branch(x, z, kernels, self.chunk_size)
        if self.backward_branch is not None:
            out_b = self.backward_branch(x.flip(-1), z.flip(-1), kernels, self.chunk_size)
            out = 0.5 * (out + out_b.flip(-1))
        return self.out_proj(out.transpose(1, 2))

    def uses_fused(self, device: torch.device) -> bool:
        """True when this mixer runs the fused op on ``device`` (``fused`` set, CUDA kernels in use)."""
        return self.fused and get_kernels(self.backend, device).name == "cuda" and fused.fused_available()

    def _forward_fused(self, hidden: torch.Tensor) -> torch.Tensor:
        """The fused path: in_proj, both directions and out_proj as one op."""
        branches = [self.forward_branch] + ([self.backward_branch] if self.backward_branch is not None else [])
        tensors = [(b.conv1d.weight, b.conv1d.bias, b.x_proj.weight, b.dt_proj.weight, -torch.exp(b.A_log.float()),
                    b.D.float(), b.dt_proj.bias.float()) for b in branches]
        return fused.bimamba_inner_fn(hidden, self.in_proj.weight, self.out_proj.weight, tensors)
