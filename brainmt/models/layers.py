"""Building blocks of BrainMT: the 3-D conv stem, the Mamba and attention blocks, stochastic depth."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from brainmt.models.mamba import BiMambaMixer
from brainmt.models.ops import fused

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _norm3d(channels: int, kind: str = "group") -> nn.Module:
    """The stem's normalisation: GroupNorm over each frame (independent of batch size, so frames folded into the
    batch do not mix), or none (``model.stem_norm``)."""
    return nn.GroupNorm(min(8, channels), channels) if kind == "group" else nn.Identity()


def conv_output_size(size: int, num_stride2: int = 4) -> int:
    """Size of one axis after ``num_stride2`` stride-2 convolutions with kernel 3 and padding 1."""
    for _ in range(num_stride2):
        size = (size + 1) // 2
    return size


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that, with ``channels_last`` set, runs CUDA inputs in channels-last layout (weights converted per call)."""

    channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve; in channels-last layout on CUDA when ``channels_last`` is set."""
        if self.channels_last and x.is_cuda:
            layout = torch.channels_last_3d
            return self._conv_forward(x.contiguous(memory_format=layout), self.weight.contiguous(memory_format=layout), self.bias)
        return super().forward(x)


class ResidualBlock3d(nn.Module):
    """Residual 3-D conv block that halves each spatial axis: (N, C_in, D, H, W) -> (N, C_out, ~D/2, ~H/2, ~W/2)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = Conv3d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm1 = _norm3d(out_channels, norm)
        self.conv2 = Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm3d(out_channels, norm)
        self.shortcut = nn.Sequential(
            Conv3d(in_channels, out_channels, 1, stride=2, bias=False), _norm3d(out_channels, norm)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = F.gelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.gelu(out + self.shortcut(x))


class ConvStem(nn.Module):
    """Per-frame conv stem: (N, C, D, H, W) -> (N, K, embed_dim) with K = prod of the axes after 4 halvings.

    Two stride-2 convolutions, then two residual blocks that each downsample by 2, then a 1x1x1
    projection to ``embed_dim``. A 91x109x91 volume gives a 6x7x6 grid: K = 252 tokens.
    """

    def __init__(self, in_channels: int, channels: list[int], embed_dim: int, norm: str = "group") -> None:
        super().__init__()
        c0, c1, c2, c3 = channels
        self.conv1 = nn.Sequential(Conv3d(in_channels, c0, 3, stride=2, padding=1, bias=False), _norm3d(c0, norm), nn.GELU())
        self.conv2 = nn.Sequential(Conv3d(c0, c1, 3, stride=2, padding=1, bias=False), _norm3d(c1, norm), nn.GELU())
        self.res1 = ResidualBlock3d(c1, c2, norm)
        self.res2 = ResidualBlock3d(c2, c3, norm)
        self.proj = Conv3d(c3, embed_dim, 1)

    def set_channels_last(self, enabled: bool) -> None:
        """Run the convolutions of CUDA inputs in channels-last layout (parameters keep their layout)."""
        for m in self.modules():
            if isinstance(m, Conv3d):
                m.channels_last = enabled

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Return tokens (N, K, embed_dim) and the token grid (d, h, w)."""
        x = self.proj(self.res2(self.res1(self.conv2(self.conv1(x)))))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale kept samples by 1/(1-p); identity in eval mode or when p == 0."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _mean_over_ranks(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The mean of ``t`` over its first dimension and, in a distributed run, over every rank's ``t`` (the ranks'
    batch sizes may differ; one all-reduce), and how many rows it is over (the same number on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t.sum(0) / max(len(t), 1), len(t)
    sums = torch.cat([t.sum(0), t.new_tensor([len(t)])])
    dist.all_reduce(sums)
    count = int(sums[-1])
    return sums[:-1] / max(count, 1), count


class RunningStandardize(nn.Module):
    """Each feature standardised across scans with running mean and variance (``model.head_norm: running``).

    The statistics are updated from every training batch without gradient (a running average over the first
    1 / momentum batches, then exponential) and used as they are in training and evaluation alike, so a batch of 1
    or 2 does not set the scale as a BatchNorm's would. Until two batches have been seen the input passes unchanged.
    Under DDP each update takes the whole global batch (an all-reduce, as SyncBatchNorm), so every rank keeps the same
    statistics and normalises alike, and they are those of one process seeing the global batch.
    """

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-12) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.zeros(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, x: torch.Tensor, seen: int) -> bool:
        """Fold this (global) batch into the statistics; False for an empty one."""
        if seen == 0:                                # two passes: a near-constant feature's spread survives
            mean, count = _mean_over_ranks(x)
            if count == 0:                           # an empty global batch: nothing to learn (every rank agrees)
                return False
            self.mean.copy_(mean)
            self.var.copy_(_mean_over_ranks((x - self.mean).square())[0])
        else:
            delta = x - self.mean
            moments, count = _mean_over_ranks(torch.cat([delta, delta.square()], 1))
            if count == 0:
                return False
            rate = max(self.momentum, 1.0 / (seen + 1))
            self.mean.add_(moments[:len(self.mean)], alpha=rate)
            self.var.lerp_(moments[len(self.mean):], rate)
        self.updates += 1
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = int(self.updates)                     # one host read a forward (two under DDP: the batch count)
        if self.training and self._update(x.float(), seen):
            seen += 1
        if seen < 2:
            return x
        return (x - self.mean) / torch.sqrt(self.var + self.eps)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch, initialised to ``init`` (CaiT's LayerScale)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the last axis, in the input's dtype (a bf16 branch stays bf16 under autocast)."""
        return x * self.gamma.to(x.dtype)


def layer_scale(dim: int, init: float) -> nn.Module:
    """``model.layer_scale``: a :class:`LayerScale` starting at ``init``, or the identity when ``init`` is 0."""
    return LayerScale(dim, init) if init > 0 else nn.Identity()


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block: x + DropPath(LayerScale(BiMamba(RMSNorm(x)))); (B, L, E) -> (B, L, E).

    ``forward_fused`` is the same block on the split stream x = hidden + residual (mamba-ssm's layout),
    with the residual add fused into the RMSNorm kernel and the residual kept in float32.
    """

    def __init__(self, dim: int, drop_path: float, layer_scale_init: float = 0.0, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.ls = layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return x + self.drop_path(self.ls(self.mixer(self.norm(x))))

    def forward_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (hidden', residual'), where residual' = hidden + residual is this block's input."""
        normed, residual = fused.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps or 1e-5)
        return self.drop_path(self.ls(self.mixer(normed))), residual


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``: (B, L, E) -> (B, L, E)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 sdpa_backend: str = "auto") -> None:
        super().__init__()
        if sdpa_backend != "auto" and sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be auto or one of {sorted(SDPA_BACKENDS)}, got {sdpa_backend!r}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.sdpa_backend = sdpa_backend

    def _sdpa_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """On CUDA, ``sdpa_backend`` first, then the others (each is used only where it supports the inputs)."""
        if self.sdpa_backend == "auto" or device.type != "cuda":
            return contextlib.nullcontext()
        first = SDPA_BACKENDS[self.sdpa_backend]
        return sdpa_kernel([first] + [b for b in SDPA_BACKENDS.values() if b != first], set_priority=True)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Attention over the L tokens: (B, L, E) -> (B, L, E), or (B, 1, E) for the first token's query only."""
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        if first_only:  # the class token's row: one query against every key
            q = F.linear(x[:, :1], self.qkv.weight[:dim], self.qkv.bias[:dim]).view(batch, 1, heads, head_dim).transpose(1, 2)
            kv = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:]).view(batch, length, 2, heads, head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        with self._sdpa_context(x.device):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, q.shape[2], dim)))


class Mlp(nn.Module):
    """Two-layer GELU MLP: (..., E) -> (..., E)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with its own norms and MLP, each branch through its LayerScale: (B, L, E) -> (B, L, E)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float,
                 sdpa_backend: str = "auto", layer_scale_init: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop, drop, sdpa_backend)
        self.ls1 = layer_scale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Apply the block: (B, L, E) -> (B, L, E), or only its first token's output (B, 1, E) when ``first_only``."""
        if first_only:
            x = x[:, :1] + self.drop_path(self.ls1(self.attn(self.norm1(x), first_only=True)))
        else:
            x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
