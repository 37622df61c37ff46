"""The loss and one optimizer step: autocast, the task's loss, backward over micro-batches, clip, step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` ("bf16" or "fp16") on a CUDA device; a no-op for fp32 or another device."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def normalise(y: torch.Tensor, stats: dict) -> torch.Tensor:
    """Targets as the model sees them: z-scored with the training statistics (regression), 0/1 (classification)."""
    return (y - stats["mean"]) / stats["std"] if stats["task"] == "regression" else y


def task_loss(out: torch.Tensor, y: torch.Tensor, task: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """MSE (regression) or binary cross-entropy on logits, 0/1 targets smoothed to eps/2 and 1 - eps/2."""
    if task == "regression":
        return F.mse_loss(out, y)
    return F.binary_cross_entropy_with_logits(out, y * (1 - label_smoothing) + label_smoothing / 2)


def compute_loss(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, task: str,
                 device: torch.device, precision: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Model output (autocast as configured) -> the task's loss in fp32."""
    with autocast(device, precision):
        out = forward(x).squeeze(1).float()
    return task_loss(out, y, task, label_smoothing)


def jitter_intensity(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Each sample of (B, T, C, D, H, W) times 1 + N(0, scale) plus N(0, scale): a global intensity change.
    The draws come from the CPU generator, whose state checkpoints carry (resume stays exact)."""
    if scale <= 0:
        return x
    gain, shift = (1 + scale * torch.randn(x.shape[0])), scale * torch.randn(x.shape[0])
    view = (-1,) + (1,) * (x.dim() - 1)
    return x * gain.to(x.device).view(view) + shift.to(x.device).view(view)


def replicas_agree(model: torch.nn.Module) -> bool:
    """True when every rank holds the same weights (compares a float64 checksum across ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        device = next(model.parameters()).device
        lo, hi = total.clone().to(device), total.clone().to(device)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(lo == hi)
