"""BrainMT: conv stem -> tokens (+ spatial, temporal position, class token) -> bi-Mamba -> attention -> head."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from brainmt.config import ModelConfig
from brainmt.models.layers import AttentionBlock, ConvStem, MambaBlock, RunningStandardize, conv_output_size

# attention kernels whose outputs a checkpointed attention block keeps (everything else is recomputed)
_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)


def _keep_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing: save the attention kernels' outputs, recompute the rest (norms, linears, GELU)."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_context() -> tuple[Any, Any]:
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` with :func:`_keep_attention_policy`."""
    return create_selective_checkpoint_contexts(_keep_attention_policy)


def resize_temporal(table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A temporal embedding table (1, E, T) linearly interpolated to ``num_frames`` entries (corners aligned)."""
    if table.shape[-1] == num_frames:
        return table
    return F.interpolate(table, size=num_frames, mode="linear", align_corners=True)


def resize_spatial(table: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """A spatial embedding grid (1, E, D, H, W) trilinearly resized to ``grid`` (corners aligned)."""
    if tuple(grid) == tuple(table.shape[2:]):
        return table
    return F.interpolate(table, size=tuple(grid), mode="trilinear", align_corners=True)


class BrainMT(nn.Module):
    """BrainMT for one scalar per scan: ``model(x)`` maps (B, T, C, D, H, W) to (B, 1).

    Tokens follow a class token at position 0. ``scan_order="time"`` (the paper's) orders them time-first (all
    frames of spatial token 0, then of token 1, ...), so the bidirectional Mamba stack scans each location's time
    course; ``"space"`` orders them frame by frame (all K tokens of frame 0, then of frame 1, ...), so the scan
    meets every region of a frame within K tokens and can relate regions' co-temporal signals.
    ``attention="global"`` attends over all 1 + T*K tokens (as the official code);
    ``attention="spatial"`` first averages each spatial token over time and attends over 1 + K tokens;
    ``attention="frame"`` attends over the 1 + K tokens of each frame (the class token copied to every frame) and
    averages the class token's outputs over frames: regions are compared at each time point, each carrying its
    own history from the Mamba scan (what coupling and lags between distant regions need), at T * (1 + K)^2 cost.
    The last attention block computes only the class token's row (the only one the head reads).

    Speed and memory options (the same model and weights): ``checkpointing`` recomputes Mamba blocks
    whole and attention blocks selectively (their attention kernels' outputs are kept). On CUDA only
    (the CPU path is unchanged): ``stem_chunk_frames`` runs the stem on that many frames at a time and
    recomputes it in the backward pass; ``fused_kernels`` runs the Mamba stage through
    :mod:`brainmt.models.ops.fused`; ``channels_last`` and ``compile`` speed up the stem; ``sdpa_backend``
    picks the attention kernel.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.grid = tuple(conv_output_size(s) for s in cfg.volume_shape)
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.stem = ConvStem(cfg.in_channels, cfg.stem_channels, dim, cfg.stem_norm)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *self.grid))      # spatial, on the token grid
        self.temporal_embed = nn.Parameter(torch.zeros(1, dim, cfg.num_frames))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        depth = cfg.mamba_depth + cfg.attention_depth
        rates = torch.linspace(0, cfg.drop_path_rate, depth, device="cpu").tolist() if depth else []
        mixer = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank,
                     dt_min=cfg.dt_min, dt_max=cfg.dt_max, bidirectional=cfg.bidirectional,
                     backend=cfg.backend, chunk_size=cfg.scan_chunk_size, fused=cfg.fused_kernels)
        self.mamba_blocks = nn.ModuleList(MambaBlock(dim, rates[i], cfg.layer_scale, **mixer) for i in range(cfg.mamba_depth))
        self.attention_blocks = nn.ModuleList(
            AttentionBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.drop_rate, cfg.attn_drop_rate, rates[cfg.mamba_depth + i],
                           cfg.sdpa_backend, cfg.layer_scale)
            for i in range(cfg.attention_depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head_norm = RunningStandardize(dim) if cfg.head_norm == "running" else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(dim, 1)
        self._init_weights()
        self.num_spatial_tokens = num_tokens
        self.stem.set_channels_last(cfg.channels_last)
        self.__dict__["_compiled_stem"] = {}  # compiled on the first CUDA forward; not submodules (no state_dict keys)

    def _init_weights(self) -> None:
        """Generic init for stem, embeddings, attention and head; the Mamba mixers keep their own (dt, A, D)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.temporal_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # without the stem's GroupNorm only a variance-preserving (fan_in) init keeps the signal's scale: fan_out
        # shrinks it about 50-fold through the paper's stem, below the position embeddings (docs/model.md)
        conv_mode = "fan_in" if self.cfg.stem_norm == "none" else "fan_out"
        for module in [self.stem, *self.attention_blocks, self.head]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Conv3d):
                    nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        # GPT-2 style: scale each residual branch's output projection by 1/sqrt(2 * depth)
        depth = max(1, len(self.mamba_blocks) + len(self.attention_blocks))
        with torch.no_grad():
            for blk in self.mamba_blocks:
                blk.mixer.out_proj.weight.div_((2 * depth) ** 0.5)
            for blk in self.attention_blocks:
                blk.attn.proj.weight.div_((2 * depth) ** 0.5)
                blk.mlp.fc2.weight.div_((2 * depth) ** 0.5)

    def _temporal_embedding(self, num_frames: int) -> torch.Tensor:
        """(1, T, 1, E): the learned table, linearly interpolated when T differs from its length."""
        if num_frames > self.cfg.max_frames:
            raise ValueError(f"input has {num_frames} frames, more than model.max_frames={self.cfg.max_frames}")
        return resize_temporal(self.temporal_embed, num_frames).transpose(1, 2).unsqueeze(2)

    def _spatial_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(1, 1, K, E): the learned grid, trilinearly resized when the input volume gives another grid."""
        return resize_spatial(self.pos_embed, grid).flatten(2).transpose(1, 2).unsqueeze(1)

    def _checkpointed_stem(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The stem with its activations dropped after the forward and recomputed in the backward."""
        return checkpoint(self.stem, frames, use_reentrant=False)

    def _stem_fn(self, recompute: bool, cuda: bool) -> Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int, int]]]:
        """The stem callable: plain or checkpointed, compiled (once per kind) on CUDA when ``compile`` is set."""
        fn = self._checkpointed_stem if recompute else self.stem
        if not (self.cfg.compile and cuda):
            return fn
        compiled = self.__dict__["_compiled_stem"]
        if recompute not in compiled:
            compiled[recompute] = torch.compile(fn)
        return compiled[recompute]

    def _run_stem(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(N, C, D, H, W) -> tokens (N, K, E): whole, or on CUDA in chunks of ``stem_chunk_frames`` recomputed backward."""
        chunk, cuda = self.cfg.stem_chunk_frames, frames.device.type == "cuda"
        if chunk <= 0 or not cuda:
            return self._stem_fn(False, cuda)(frames)
        stem = self._stem_fn(torch.is_grad_enabled(), cuda)
        outs = [stem(part) for part in frames.split(chunk)]
        return torch.cat([out[0] for out in outs]), outs[0][1]

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else blk(x)
        return x

    def _run_mamba(self, seq: torch.Tensor) -> torch.Tensor:
        """The Mamba stack, on the fused path (split hidden + float32 residual stream) when every mixer uses it."""
        use_checkpoint = self.cfg.checkpointing in ("mamba", "all") and torch.is_grad_enabled()
        blocks = self.mamba_blocks
        if not len(blocks) or not all(blk.mixer.uses_fused(seq.device) for blk in blocks):
            return self._run(blocks, seq, use_checkpoint)
        hidden, residual = seq, None
        for blk in blocks:
            if use_checkpoint:
                hidden, residual = checkpoint(blk.forward_fused, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = blk.forward_fused(hidden, residual)
        return residual + hidden

    def _run_attention(self, seq: torch.Tensor) -> torch.Tensor:
        """The attention blocks; the last returns only the class token, (B, 1, E)."""
        use_checkpoint = self.cfg.checkpointing in ("attention", "all") and torch.is_grad_enabled()
        last = len(self.attention_blocks) - 1
        for i, blk in enumerate(self.attention_blocks):
            fn = functools.partial(blk, first_only=i == last)
            if use_checkpoint:
                seq = checkpoint(fn, seq, use_reentrant=False, context_fn=_keep_attention_context)
            else:
                seq = fn(seq)
        return seq

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """``model.input_norm`` on (B, T, C, D, H, W): each voxel's time course centred (and scaled) over the T frames."""
        if self.cfg.input_norm == "none":
            return x
        xf = x.float()
        xf = xf - xf.mean(dim=1, keepdim=True)
        if self.cfg.input_norm == "zscore":    # constant voxels (outside the brain) stay 0
            xf = xf / xf.std(dim=1, keepdim=True, correction=0).clamp_min(1e-6)
        return xf.to(x.dtype)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Embed (B, T, C, D, H, W) into the sequence (B, 1 + K*T, E) in ``scan_order``; returns it with K and T."""
        if x.dim() != 6:
            raise ValueError(f"BrainMT expects (B, T, C, D, H, W), got shape {tuple(x.shape)}")
        batch, frames = x.shape[:2]
        feats, grid = self._run_stem(self.normalise_input(x).flatten(0, 1))      # (B*T, K, E)
        feats = feats.view(batch, frames, -1, feats.shape[-1])                   # (B, T, K, E)
        feats = feats + self._spatial_embedding(grid) + self._temporal_embedding(frames)
        k = feats.shape[2]
        if self.cfg.scan_order == "time":
            feats = feats.transpose(1, 2)                                        # (B, K, T, E): time-first
        seq = feats.reshape(batch, k * frames, -1)
        cls = self.cls_token.expand(batch, -1, -1)
        return self.pos_drop(torch.cat([cls, seq], dim=1)), k, frames

    def _location_major(self, seq: torch.Tensor, k: int, frames: int) -> torch.Tensor:
        """The Mamba output without the class token as (B, K, T, E), whatever the scan order."""
        grid = seq[:, 1:].view(seq.shape[0], *((k, frames) if self.cfg.scan_order == "time" else (frames, k)), -1)
        return grid if self.cfg.scan_order == "time" else grid.transpose(1, 2)

    def mamba_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the Mamba stack, (B, 1 + K*T, E); position 0 is the class token."""
        seq, _, _ = self.tokens(x)
        return self._run_mamba(seq)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class-token feature, (B, E)."""
        seq, k, frames = self.tokens(x)
        seq = self._run_mamba(seq)
        batch = seq.shape[0]
        if self.cfg.attention == "spatial":
            spatial = self._location_major(seq, k, frames).mean(dim=2)                    # (B, K, E)
            seq = torch.cat([seq[:, :1], spatial], dim=1)
        elif self.cfg.attention == "frame":
            per_frame = self._location_major(seq, k, frames).transpose(1, 2).reshape(batch * frames, k, -1)
            seq = torch.cat([seq[:, :1].repeat_interleave(frames, dim=0), per_frame], dim=1)   # (B*T, 1 + K, E)
        seq = self._run_attention(seq)
        cls = seq[:, 0].view(batch, -1, seq.shape[-1]).mean(dim=1)                           # (B, E)
        return self.norm(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, D, H, W) -> (B, 1): a regression value or a classification logit, always in float32.

        The head runs outside autocast: a bf16 logit has 8 significant bits (steps of 0.004 near 1), which tied the
        outputs of a model near the prior and left its validation AUROC at exactly 0.5.
        """
        feats = self.forward_features(x).float()
        # no autocast on other devices (the meta device counts shapes and FLOPs)
        fp32 = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") else nullcontext()
        with fp32:
            return self.head(self.head_drop(self.head_norm(feats)))


def build_model(cfg: ModelConfig) -> BrainMT:
    """Build BrainMT from the model section of the config."""
    return BrainMT(cfg)


def parameter_breakdown(model: BrainMT) -> dict[str, int]:
    """Trainable parameters per part of the model, plus the total."""
    parts = {
        "conv stem": model.stem,
        "embeddings (spatial, temporal, cls)": [model.pos_embed, model.temporal_embed, model.cls_token],
        f"Mamba blocks (x{len(model.mamba_blocks)})": model.mamba_blocks,
        f"attention blocks (x{len(model.attention_blocks)})": model.attention_blocks,
        "final norm + head": [model.norm, model.head],
    }
    out: dict[str, int] = {}
    for name, part in parts.items():
        items = part if isinstance(part, list) else [part]
        out[name] = sum(
            p.numel() for item in items for p in (item.parameters() if isinstance(item, nn.Module) else [item])
        )
    out["total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out
