"""BrainMT: conv stem -> tokens (+ spatial, temporal position, class token) -> bi-Mamba -> attention -> head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from brainmt.config import ModelConfig
from brainmt.models.layers import AttentionBlock, ConvStem, MambaBlock, conv_output_size


class BrainMT(nn.Module):
    """BrainMT for one scalar per scan: ``model(x)`` maps (B, T, C, D, H, W) to (B, 1).

    Tokens are ordered time-first (all frames of spatial token 0, then of token 1, ...) after a
    class token at position 0, so the bidirectional Mamba stack scans each location's time course.
    ``attention="global"`` attends over all 1 + T*K tokens (as the official code);
    ``attention="spatial"`` first averages each spatial token over time and attends over 1 + K tokens.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.grid = tuple(conv_output_size(s) for s in cfg.volume_shape)
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.stem = ConvStem(cfg.in_channels, cfg.stem_channels, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *self.grid))      # spatial, on the token grid
        self.temporal_embed = nn.Parameter(torch.zeros(1, dim, cfg.num_frames))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        depth = cfg.mamba_depth + cfg.attention_depth
        rates = torch.linspace(0, cfg.drop_path_rate, depth).tolist() if depth else []
        mixer = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank,
                     dt_min=cfg.dt_min, dt_max=cfg.dt_max, bidirectional=cfg.bidirectional,
                     backend=cfg.backend, chunk_size=cfg.scan_chunk_size)
        self.mamba_blocks = nn.ModuleList(MambaBlock(dim, rates[i], **mixer) for i in range(cfg.mamba_depth))
        self.attention_blocks = nn.ModuleList(
            AttentionBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.drop_rate, cfg.attn_drop_rate, rates[cfg.mamba_depth + i])
            for i in range(cfg.attention_depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(dim, 1)
        self._init_weights()
        self.num_spatial_tokens = num_tokens

    def _init_weights(self) -> None:
        """Generic init for stem, embeddings, attention and head; the Mamba mixers keep their own (dt, A, D)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.temporal_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in [self.stem, *self.attention_blocks, self.head]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Conv3d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
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
        table = self.temporal_embed
        if num_frames != table.shape[-1]:
            table = F.interpolate(table, size=num_frames, mode="linear", align_corners=True)
        return table.transpose(1, 2).unsqueeze(2)

    def _spatial_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(1, 1, K, E): the learned grid, trilinearly resized when the input volume gives another grid."""
        pos = self.pos_embed
        if tuple(grid) != tuple(pos.shape[2:]):
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=True)
        return pos.flatten(2).transpose(1, 2).unsqueeze(1)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_checkpoint and self.training else blk(x)
        return x

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Embed (B, T, C, D, H, W) into the time-first sequence (B, 1 + K*T, E); returns it with K and T."""
        if x.dim() != 6:
            raise ValueError(f"BrainMT expects (B, T, C, D, H, W), got shape {tuple(x.shape)}")
        batch, frames = x.shape[:2]
        feats, grid = self.stem(x.flatten(0, 1))                                # (B*T, K, E)
        feats = feats.view(batch, frames, -1, feats.shape[-1])                   # (B, T, K, E)
        feats = feats + self._spatial_embedding(grid) + self._temporal_embedding(frames)
        k = feats.shape[2]
        seq = feats.transpose(1, 2).reshape(batch, k * frames, -1)               # time-first
        cls = self.cls_token.expand(batch, -1, -1)
        return self.pos_drop(torch.cat([cls, seq], dim=1)), k, frames

    def mamba_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the Mamba stack, (B, 1 + K*T, E); position 0 is the class token."""
        seq, _, _ = self.tokens(x)
        return self._run(self.mamba_blocks, seq, self.cfg.checkpointing in ("mamba", "all"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class-token feature, (B, E)."""
        seq, k, frames = self.tokens(x)
        seq = self._run(self.mamba_blocks, seq, self.cfg.checkpointing in ("mamba", "all"))
        if self.cfg.attention == "spatial":
            spatial = seq[:, 1:].view(seq.shape[0], k, frames, -1).mean(dim=2)  # (B, K, E)
            seq = torch.cat([seq[:, :1], spatial], dim=1)
        seq = self._run(self.attention_blocks, seq, self.cfg.checkpointing in ("attention", "all"))
        return self.norm(seq[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, D, H, W) -> (B, 1): a regression value or a classification logit."""
        return self.head(self.head_drop(self.forward_features(x)))


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
