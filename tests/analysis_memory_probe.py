"""Run Integrated Gradients once in a fresh process and print its memory use as JSON (for tests/test_analysis.py).

``python tests/analysis_memory_probe.py FRAMES STEPS BATCH`` where BATCH is an internal batch size, ``none``
(captum unbounded: every step at once) or ``auto:<bytes>`` (chosen by brainmt for that much free memory).
Prints the peak resident memory the attribution added (Linux: the peak ``VmHWM`` is reset through
``/proc/self/clear_refs`` just before, then read after, minus ``VmRSS`` before), the batch sizes the model
saw, and the chosen batch size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from brainmt.analysis.attribution import PackedModel, choose_internal_batch_size
from brainmt.config import load_config
from brainmt.models import build_model


def _status_bytes(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    """Build the debug model, attribute one window, print the memory it took."""
    frames, steps, batch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config("debug", [f"model.num_frames={frames}"])
    shape = tuple(cfg.model.volume_shape)
    model = PackedModel(build_model(cfg.model).eval().requires_grad_(False), np.arange(int(np.prod(shape))), shape)
    x = torch.randn(1, frames, int(np.prod(shape)))
    background, baseline = torch.zeros(1), torch.zeros_like(x)
    seen: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[0])))
    chosen, per_sample = None, None
    if batch.startswith("auto:"):
        chosen, per_sample = choose_internal_batch_size(model, x, background, steps, free_bytes=int(batch[5:]))
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    ig.attribute(x, baselines=baseline, additional_forward_args=(background,), n_steps=2, internal_batch_size=1)  # warm-up
    seen.clear()
    Path("/proc/self/clear_refs").write_text("5")      # reset the peak resident set size to the current one
    before = _status_bytes("VmRSS")
    internal = None if batch == "none" else chosen or int(batch)
    attr = ig.attribute(x, baselines=baseline, additional_forward_args=(background,), n_steps=steps,
                        internal_batch_size=internal)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"added_peak_bytes": peak - before, "batch_sizes": seen, "internal_batch_size": internal,
                      "bytes_per_sample": per_sample, "finite": bool(torch.isfinite(attr).all())}))


if __name__ == "__main__":
    main()
