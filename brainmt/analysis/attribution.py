"""Integrated Gradients (captum) on BrainMT's full input: every frame of an evaluation window.

The model is wrapped as :class:`PackedModel`, a function of the packed brain voxels (B, T, n_brain):
the dense (B, T, 1, D, H, W) volume is built inside the forward pass, differentiably, with the
scan's background outside the brain. Input and baseline agree outside the brain, so IG there is
exactly 0 and the attributions over brain voxels alone satisfy completeness:
sum(IG) = f(input) - f(baseline), up to the error of the path integral.

Memory: captum evaluates ``n_steps`` scaled copies of every input; ``internal_batch_size`` bounds how
many go through the model (forward and backward) at once. :func:`choose_internal_batch_size` picks it
from the device's free memory and the activation bytes one sample keeps for the backward pass.
"""

from __future__ import annotations

import itertools
import logging
import math
import os

import numpy as np
import torch

from brainmt.config import AnalysisConfig, config_choices
from brainmt.data.loader import ShardSet

log = logging.getLogger("brainmt.analysis")
BASELINES = tuple(config_choices(AnalysisConfig, "baseline"))   # analysis.baseline's values
STATIC_BASELINES = ("mean", "temporal_mean", "zeros", "background")   # the same volume in every frame


class AttributionError(RuntimeError):
    """Attributions could not be computed or are unusable; the message names the scan and window."""


class PackedModel(torch.nn.Module):
    """``model`` as a function of packed brain voxels: (B, T, n_brain) and a background (B,) -> outputs (B,)."""

    def __init__(self, model: torch.nn.Module, brain_index: np.ndarray, volume_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        self.volume_shape = tuple(int(s) for s in volume_shape)
        self.register_buffer("brain_index", torch.as_tensor(np.asarray(brain_index), dtype=torch.long), persistent=False)

    def forward(self, packed: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """(B, T, n_brain), (B,) -> (B,): the model's output on the dense volumes."""
        b, t, _ = packed.shape
        voxels = int(np.prod(self.volume_shape))
        dense = background.to(packed.dtype).view(b, 1, 1).expand(b, t, voxels)
        dense = dense.index_copy(2, self.brain_index, packed)          # out of place: gradients reach ``packed``
        return self.model(dense.view(b, t, 1, *self.volume_shape)).reshape(b)


def _evenly_spaced(scans: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``scans``, evenly spaced from the first to the last."""
    return [scans[int(i)] for i in np.unique(np.linspace(0, len(scans) - 1, min(count, len(scans))).round())]


def _first_chunks(shards: ShardSet, scans: list[str], max_scans: int):
    """The first stored chunk (frames, n_brain) float64 of up to ``max_scans`` evenly spaced ``scans``."""
    if not scans:
        raise AttributionError(f"no scans in {shards.root} to average for the baseline")
    for scan in _evenly_spaced(scans, max_scans):
        yield shards.read_frames(scan, 0, min(shards.chunk_frames, shards.scans[scan]["frames"])).astype(np.float64)


def training_mean(shards: ShardSet, scans: list[str], max_scans: int = 64) -> np.ndarray:
    """The average brain of ``scans``: float32 (n_brain,), each voxel's mean over the first stored chunk of up to
    ``max_scans`` evenly spaced scans (z-scored values, so about 0 on average; the static anatomy remains)."""
    total, frames = np.zeros(shards.n_brain, dtype=np.float64), 0
    for block in _first_chunks(shards, scans, max_scans):
        total += block.sum(axis=0)
        frames += len(block)
    return (total / frames).astype(np.float32)


def training_fluctuation(shards: ShardSet, scans: list[str], max_scans: int = 64) -> np.ndarray:
    """Each voxel's typical fluctuation: float32 (n_brain,), the root mean square over up to ``max_scans`` scans of
    its standard deviation over the frames of their first stored chunk."""
    blocks = list(_first_chunks(shards, scans, max_scans))
    return np.sqrt(np.mean([block.var(axis=0) for block in blocks], axis=0)).astype(np.float32)


def _target_values(shards: ShardSet, scans: list[str], target: str) -> dict[str, float]:
    """Each scan's finite value of ``target`` (scans without one are left out)."""
    values = {}
    for scan in scans:
        try:
            value = float(shards.scans[scan].get("targets", {}).get(target))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            values[scan] = value
    return values


def _spread_over_target(values: dict[str, float], count: int, classes: bool) -> list[str]:
    """Up to ``count`` of the scans in ``values``: for class labels as many of each class as it can give, taken in
    turn and evenly spaced by id within it; for a score evenly spaced in the score's order."""
    ordered = sorted(values, key=lambda scan: (values[scan], scan))
    if not classes:
        return _evenly_spaced(ordered, count)
    groups = [[scan for scan in ordered if values[scan] == c] for c in sorted(set(values.values()))]
    quota = [0] * len(groups)
    while sum(quota) < min(count, len(ordered)):
        for i, group in enumerate(groups):
            if quota[i] < len(group) and sum(quota) < count:
                quota[i] += 1
    picks = [_evenly_spaced(group, n) if n else [] for group, n in zip(groups, quota)]
    return [scan for turn in itertools.zip_longest(*picks) for scan in turn if scan is not None]


def reference_scans(shards: ShardSet, scans: list[str], count: int, frames: int, target: str | None = None,
                    classes: bool = False) -> list[str]:
    """The ``scans`` baseline's reference scans: up to ``count`` of ``scans`` that have ``frames`` frames, spread over
    the model's ``target`` (``classes``: as many of each class as can be; else over the score's range), so that their
    mean output is not one class's; evenly spaced by id when no scan has the target."""
    long_enough = [s for s in scans if shards.scans[s]["frames"] >= frames]
    if not long_enough:
        raise AttributionError(f"no scan in {shards.root} has the {frames} frames a reference window needs")
    values = _target_values(shards, long_enough, target) if target else {}
    return _spread_over_target(values, count, classes) if values else _evenly_spaced(long_enough, count)


def reference_windows(shards: ShardSet, scans: list[str], count: int, frames: int, target: str | None = None,
                      classes: bool = False) -> np.ndarray:
    """The ``scans`` baseline's references: float32 (K, frames, n_brain), the first ``frames`` frames of
    :func:`reference_scans` (real windows of other subjects: the caller leaves the analysed subject's scans out)."""
    chosen = reference_scans(shards, scans, count, frames, target, classes)
    return np.stack([shards.read_frames(scan, 0, frames) for scan in chosen]).astype(np.float32)


def resolve_baseline(kind: str, input_norm: str, stem_norm: str = "group") -> str:
    """``analysis.baseline`` for a model with this ``model.input_norm`` and ``model.stem_norm``: ``auto`` becomes
    ``noise`` for a centring model whose stem normalises each frame, else ``mean``; such a model refuses a baseline
    constant in time.

    It sees a window only through its voxels' deviations from their means over the frames, and its stem
    normalises each frame (GroupNorm after a convolution without bias): every point of the straight path from a
    baseline constant in time is the same input up to scale, so the output jumps at the baseline and IG loses
    completeness."""
    degenerate = input_norm != "none" and stem_norm == "group"
    if kind == "auto":
        return "noise" if degenerate else "mean"
    if degenerate and kind in STATIC_BASELINES:
        raise AttributionError(f"analysis.baseline={kind} is constant in time and the model centres each voxel's time "
                               f"course (model.input_norm={input_norm}): along the IG path the model sees the input "
                               "rescaled, its output jumps at the baseline and completeness fails; use noise (what "
                               "the default auto picks)")
    return kind


def make_baseline(kind: str, packed: torch.Tensor, background: torch.Tensor, mean_brain: torch.Tensor | None,
                  generator: torch.Generator | None = None, fluctuation: torch.Tensor | None = None,
                  references: torch.Tensor | None = None) -> torch.Tensor:
    """The baseline of packed windows (W, T, n_brain) for ``kind`` (see :data:`BASELINES`); same shape and device,
    but for ``scans``: the K ``references`` (K, T, n_brain) as (K, 1, T, n_brain), each a baseline of every window.

    ``noise``: ``mean_brain`` plus white Gaussian noise (from ``generator``, on the CPU) scaled voxel by voxel to the
    training scans' typical ``fluctuation``: a typical brain's fluctuation power with no structure in space or time."""
    if kind == "scans":
        if references is None or references.shape[1:] != packed.shape[1:]:
            raise AttributionError("baseline 'scans' needs reference windows of the analysed windows' frames and voxels")
        return references.to(packed).unsqueeze(1)
    if kind in ("mean", "noise") and mean_brain is None:
        raise AttributionError(f"baseline '{kind}' needs the training split's mean brain")
    if kind == "noise":
        if fluctuation is None:
            raise AttributionError("baseline 'noise' needs the training split's voxel fluctuations")
        noise = torch.randn(packed.shape, generator=generator, dtype=torch.float32).to(packed)
        return (mean_brain.to(packed).view(1, 1, -1) + fluctuation.to(packed).view(1, 1, -1) * noise).contiguous()
    if kind == "zeros":
        return torch.zeros_like(packed)
    if kind == "temporal_mean":
        return packed.mean(dim=1, keepdim=True).expand_as(packed).contiguous()
    if kind == "background":
        return background.to(packed.dtype).view(-1, 1, 1).expand_as(packed).contiguous()
    if kind == "mean":
        return mean_brain.to(packed).view(1, 1, -1).expand_as(packed).contiguous()
    raise AttributionError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def saved_bytes_per_sample(model: PackedModel, packed: torch.Tensor, background: torch.Tensor) -> int:
    """Bytes one sample (1, T, n_brain) keeps for the backward pass: every distinct tensor autograd saves, plus the
    input, its gradient and the dense volume (counted with ``torch.autograd.graph.saved_tensors_hooks``)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:   # tensors without storage (e.g. wrapped subclasses): count their elements
            seen[(id(t), "other")] = t.numel() * t.element_size()
        return t

    x = packed[:1].detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, background[:1])
    del out
    dense = x.shape[1] * int(np.prod(model.volume_shape)) * x.element_size()
    return int(sum(seen.values()) + 2 * x.numel() * x.element_size() + 2 * dense)


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory plus what PyTorch has cached but not in use, or the host's
    available memory (MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        log.debug("no /proc/meminfo: using the free physical pages")
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_internal_batch_size(model: PackedModel, packed: torch.Tensor, background: torch.Tensor, steps: int,
                               free_bytes: int | None = None, fraction: float = 0.5, safety: float = 1.5) -> tuple[int, int]:
    """An internal batch size whose forward + backward fits ``fraction`` of the free memory; returns (size, bytes a
    sample). At most ``steps`` (one window's whole path at once); at least 1."""
    per_sample = saved_bytes_per_sample(model, packed, background)
    free = free_memory(packed.device) if free_bytes is None else int(free_bytes)
    size = int(fraction * free // max(1, int(safety * per_sample)))
    if size < 1:
        log.warning("one sample needs about %.1f GB for the backward pass, more than %.0f%% of the free %.1f GB; "
                    "trying internal_batch_size=1", safety * per_sample / 1e9, 100 * fraction, free / 1e9)
    return max(1, min(steps, size)), per_sample


def attribute_windows(model: PackedModel, packed: torch.Tensor, background: torch.Tensor, baseline: torch.Tensor,
                      steps: int, internal_batch_size: int, method: str = "gausslegendre") -> list[tuple]:
    """IG of windows (W, T, n_brain) against ``baseline``; returns per window
    (signed (n_brain,), absolute (n_brain,), f_input, f_baseline, ig_sum), frames summed.

    ``baseline`` is one baseline of the windows' shape, or K of them, (K, W or 1, T, n_brain): then each window's
    attributions are averaged over the K paths before the absolute value is taken (expected gradients), and
    f_baseline is the mean of the K outputs. At most ``internal_batch_size`` scaled windows go through the model at
    once: one window a call when it is smaller than ``steps``, else ``internal_batch_size // steps`` windows a call.
    """
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    baselines = baseline.unsqueeze(0) if baseline.dim() == 3 else baseline
    per_call = max(1, internal_batch_size // steps)
    out = []
    for i in range(0, packed.shape[0], per_call):
        x, bg = packed[i:i + per_call], background[i:i + per_call]
        chunk = [b[i:i + per_call] if b.shape[0] > 1 else b.expand_as(x).contiguous() for b in baselines]
        attr = sum(ig.attribute(x, baselines=b, additional_forward_args=(bg,), n_steps=steps, method=method,
                                internal_batch_size=max(internal_batch_size, x.shape[0])).detach() for b in chunk)
        attr = attr / len(chunk)
        with torch.no_grad():
            f_x = model(x, bg).double().cpu()
            f_b = sum(model(b, bg).double().cpu() for b in chunk) / len(chunk)
        signed = attr.sum(dim=1).double().cpu().numpy()
        absolute = attr.abs().sum(dim=1).double().cpu().numpy()
        sums = attr.double().sum(dim=(1, 2)).cpu()
        for w in range(x.shape[0]):
            out.append((signed[w].astype(np.float32), absolute[w].astype(np.float32), float(f_x[w]), float(f_b[w]),
                        float(sums[w])))
    return out
