"""Optimizer parameter groups, the LR schedule, and RNG state capture for exact resumption."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch

NO_DECAY_NAMES = ("pos_embed", "temporal_embed", "cls_token")


def layer_id(name: str, mamba_depth: int, attention_depth: int) -> int:
    """The depth of a BrainMT parameter for layer-wise LR decay: 0 stem and embeddings, 1..N the blocks (Mamba
    first), N + 1 the final norm and head."""
    parts = name.split(".")
    if parts[0] == "mamba_blocks":
        return int(parts[1]) + 1
    if parts[0] == "attention_blocks":
        return mamba_depth + int(parts[1]) + 1
    if parts[0] in ("norm", "head"):
        return mamba_depth + attention_depth + 1
    return 0


def optimizer_groups(model: torch.nn.Module, weight_decay: float, lr: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and conv kernels, none on norms, biases, embeddings, A, D and dt
    bias; with ``layer_decay`` < 1 each depth's own LR, lr * layer_decay^(N + 1 - depth) (BEiT's and the official
    BrainMT code's scheme). Groups keep their order whatever the decay, so optimizer states resume. Frozen parameters
    (``requires_grad`` False: ``train.freeze``) are in no group: no optimizer state, no weight decay."""
    mamba = len(getattr(model, "mamba_blocks", []))
    attention = len(getattr(model, "attention_blocks", []))
    top = mamba + attention + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or any(n in name for n in NO_DECAY_NAMES)
        depth = layer_id(name, mamba, attention) if layer_decay < 1 else top
        group = groups.setdefault((depth, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * layer_decay ** (top - depth),
            "layer": depth})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states (torch, CUDA, numpy, random) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict, device: torch.device) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
