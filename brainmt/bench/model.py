"""Model benchmark: training-step time, memory, FLOPs and MFU of BrainMT per frame count and attention scope.

``python -m brainmt.bench.model --frames 50 100 200 400 800 1200 --attention global spatial
[--checkpointing none|mamba|attention|all] [--compile] [--batch 1]`` times full training steps
(forward, backward, AdamW) on synthetic input (B, T, 1, D, H, W) in bf16 autocast: the median of
``--steps`` steps after ``--warmup`` steps, samples/s, peak memory (``torch.cuda.max_memory_allocated``),
FLOPs per step and MFU, then a least-squares line of peak memory against T (with R²), inference time
and Integrated Gradients time per subject (one window of ``--inference-frames`` frames). Each
``--variant NAME KEY=VALUE ...`` is another set of config overrides (levers side by side). A setting
that fails (out of memory) is recorded and the run goes on. ``--json`` writes everything.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no
kernels): matrix products, convolutions and attention, forward and backward, without checkpointing
recomputation (model FLOPs). The selective scan is a custom CUDA kernel that no counter sees: its
FLOPs are added analytically, 7 per state update forward (Δ·A, exp, decay·h, Δu·B, add, ·C, sum)
and twice that backward, per direction and Mamba block. MFU divides by the card's dense bf16 peak
(989.4 TFLOPS for an H100 SXM). ``--profile DIR`` writes ``torch.profiler`` kernel tables.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainmt.config import (
    AttentionScope,
    Device,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_choices,
    literal_values,
    load_config,
)
from brainmt.models import build_model
from brainmt.models.layers import conv_output_size
from brainmt.train.step import autocast, compute_loss

DENSE_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
SCAN_FLOPS_PER_UPDATE = 7      # forward; the backward counts twice that


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the CUDA card (TFLOPS), from its name; None on the CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DENSE_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if all(part in name for part in key.split()):
            return value
    return None


def scan_flops(cfg: ModelConfig, frames: int, batch: int) -> int:
    """Analytic FLOPs of the selective scans of one training step (forward + backward, every block and direction)."""
    grid = [conv_output_size(s) for s in cfg.volume_shape]
    length = 1 + frames * math.prod(grid)
    directions = 2 if cfg.bidirectional else 1
    updates = batch * cfg.expand * cfg.embed_dim * length * cfg.d_state
    return 3 * SCAN_FLOPS_PER_UPDATE * updates * directions * cfg.mamba_depth


def count_flops(cfg: ModelConfig, frames: int, batch: int) -> dict[str, int]:
    """Model FLOPs of one training step (forward + backward) on the meta device, plus the scan's analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_cfg = copy.deepcopy(cfg)
    meta_cfg.checkpointing, meta_cfg.stem_chunk_frames, meta_cfg.compile = "none", 0, False
    with torch.device("meta"):
        model = build_model(meta_cfg).train()
        x = torch.empty(batch, frames, meta_cfg.in_channels, *meta_cfg.volume_shape)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    counted = int(counter.get_total_flops())
    scan = scan_flops(cfg, frames, batch)
    return {"counted": counted, "scan_analytic": scan, "total": counted + scan}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: int) -> float:
    return n / 2**30


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _input(cfg: ModelConfig, frames: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, frames, cfg.in_channels, *cfg.volume_shape, device=device)


def _top_kernels(prof: Any, steps: int, limit: int = 15) -> list[dict]:
    """The profile's GPU kernels by device time: name, ms per step, calls per step, share of all kernel time."""
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"name": e.key[:120], "ms_per_step": e.self_device_time_total / 1e3 / steps, "calls_per_step": e.count / steps,
             "share": e.self_device_time_total / total} for e in events[:limit]]


def measure_training(cfg: ModelConfig, frames: int, batch: int, device: torch.device, precision: str, steps: int,
                     warmup: int, profile_path: Path | None = None) -> dict:
    """Median training-step time, samples/s and peak memory of one setting (and its kernel profile if asked)."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.05, fused=device.type == "cuda")
    x, y = _input(cfg, frames, batch, device), torch.randn(batch, device=device)

    def step() -> None:
        loss = compute_loss(model, x, y, "regression", device, precision)   # the training loop's forward and loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"status": "ok", "steps": steps, "warmup_s": round(warmup_s, 2),
                           "step_ms": 1e3 * statistics.median(times), "step_ms_all": [round(1e3 * t, 2) for t in times],
                           "samples_per_s": batch / statistics.median(times)}
    if device.type == "cuda":
        out["peak_gib"] = _gib(torch.cuda.max_memory_allocated(device))
        out["reserved_gib"] = _gib(torch.cuda.max_memory_reserved(device))
    if profile_path is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
            _sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=100))
        out["top_kernels"] = _top_kernels(prof, 2) if device.type == "cuda" else []
        out["profile"] = str(profile_path)
    return out


def measure_inference(cfg: ModelConfig, frames: int, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    """Median forward time of one subject's window (batch 1, eval, no gradients)."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    x = _input(cfg, frames, 1, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            with autocast(device, precision):
                model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    out = {"status": "ok", "frames": frames, "ms": 1e3 * statistics.median(times)}
    if device.type == "cuda":
        out["peak_gib"] = _gib(torch.cuda.max_memory_allocated(device))
    return out


def integrated_gradients(model: torch.nn.Module, x: torch.Tensor, n_steps: int, internal_batch_size: int,
                         cast: Any) -> torch.Tensor:
    """Integrated Gradients of ``model``'s output for one input (1, ...) against a zero baseline, as captum computes them.

    Gauss-Legendre points on [0, 1] (captum's default method), ``internal_batch_size`` scaled inputs per
    forward + backward pass; returns (x - baseline) times the weighted sum of the gradients.
    """
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32, device=x.device)
    weights = torch.tensor(weights / 2, dtype=torch.float32, device=x.device)
    baseline = torch.zeros_like(x)
    total = torch.zeros_like(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for start in range(0, n_steps, internal_batch_size):
        a = alphas[start:start + internal_batch_size]
        scaled = (baseline + a.view(shape) * (x - baseline)).requires_grad_()
        with cast():
            out = model(scaled)
        (grad,) = torch.autograd.grad(out.float().sum(), scaled)
        total += (weights[start:start + internal_batch_size].view(shape) * grad).sum(0, keepdim=True)
    return (x - baseline) * total


def measure_ig(cfg: ModelConfig, frames: int, device: torch.device, precision: str, n_steps: int, batch: int) -> dict:
    """Time of Integrated Gradients for one subject's window (after a short warm-up run), and its peak memory."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    x = _input(cfg, frames, 1, device)

    cast = functools.partial(autocast, device, precision)
    integrated_gradients(model, x, min(n_steps, batch), batch, cast)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    attributions = integrated_gradients(model, x, n_steps, batch, cast)
    _sync(device)
    out = {"status": "ok", "frames": frames, "n_steps": n_steps, "internal_batch_size": batch,
           "seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(attributions).all())}
    if device.type == "cuda":
        out["peak_gib"] = _gib(torch.cuda.max_memory_allocated(device))
    return out


def _guarded(fn: Any, device: torch.device, *args: Any, **kwargs: Any) -> dict:
    """Run one measurement; an out-of-memory or other failure becomes a record instead of stopping the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # one failed setting (OOM, a kernel that refuses the shapes) must not end the sweep
        status = "out of memory" if _is_oom(exc) else "error"
        return {"status": status, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    finally:
        _free(device)


def linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares y = slope * x + intercept and its R²; None with fewer than two points."""
    if len(xs) < 2:
        return None
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    spread = float(((y - y.mean()) ** 2).sum())
    return {"slope_gib_per_frame": float(slope), "intercept_gib": float(intercept),
            "r2": 1.0 - residual / spread if spread > 0 else 1.0, "frames": [int(v) for v in xs]}


def versions(device: torch.device) -> dict:
    """Card and software versions for the record: the self-test's, plus Triton, the device and its bf16 peak."""
    from brainmt.selftest import version_of
    from brainmt.selftest import versions as software

    info: dict[str, Any] = {**software(device), "triton": version_of("triton"), "device": str(device)}
    if device.type == "cuda":
        info["peak_bf16_tflops"] = peak_tflops(device)
    return info


def _model_config(args: argparse.Namespace, overrides: list[str]) -> ModelConfig:
    cfg = load_config(args.config, list(args.set or []))
    extra = [f"model.checkpointing={args.checkpointing}"] if args.checkpointing else []
    if args.compile:
        extra.append("model.compile=true")
    return apply_overrides(cfg, extra + list(overrides)).model  # a variant's own overrides win


def save_record(record: dict, path: str | None) -> None:
    """Write the record so far (after every setting: a run cut short keeps what it measured)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1))


def run(args: argparse.Namespace) -> dict:
    """Every (variant, attention, frames) setting, then the memory fits, inference and IG; returns the record."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    peak = args.peak_tflops or peak_tflops(device)
    variants = [(v[0], v[1:]) for v in args.variant] if args.variant else [("default", [])]
    record: dict[str, Any] = {"versions": versions(device), "precision": precision, "batch": args.batch,
                              "config": args.config, "set": args.set or [], "steps": args.steps, "warmup": args.warmup,
                              "peak_bf16_tflops": peak, "settings": [], "fits": [], "inference": [], "ig": []}
    flop_cache: dict[tuple, dict] = {}
    for name, overrides in variants:
        for attention in args.attention:
            cfg = _model_config(args, [*(f"model.{o}" if not o.startswith("model.") else o for o in overrides),
                                       f"model.attention={attention}"])
            for frames in args.frames:
                key = (attention, frames, args.batch, tuple(cfg.volume_shape), cfg.embed_dim, cfg.mamba_depth,
                       cfg.attention_depth)
                if not args.no_flops and key not in flop_cache:
                    flop_cache[key] = _guarded(count_flops, torch.device("cpu"), cfg, frames, args.batch)
                profile_path = Path(args.profile) / f"{name}_{attention}_T{frames}.txt" if args.profile else None
                result = _guarded(measure_training, device, cfg, frames, args.batch, device, precision, args.steps,
                                  args.warmup, profile_path)
                row = {"variant": name, "overrides": overrides, "attention": attention, "frames": frames, **result}
                flops = flop_cache.get(key, {})
                if "total" in flops:
                    row["flops"] = flops
                    if result["status"] == "ok" and peak:
                        row["tflops_per_s"] = flops["total"] / (result["step_ms"] / 1e3) / 1e12
                        row["mfu"] = row["tflops_per_s"] / peak
                record["settings"].append(row)
                print(_format_row(row), flush=True)
                save_record(record, args.json)
            ok = [r for r in record["settings"] if r["variant"] == name and r["attention"] == attention
                  and r["status"] == "ok" and "peak_gib" in r]
            fit = linear_fit([r["frames"] for r in ok], [r["peak_gib"] for r in ok])
            if fit:
                record["fits"].append({"variant": name, "attention": attention, **fit})
            if args.inference_frames and not args.no_extras:
                record["inference"].append({"variant": name, "attention": attention, **_guarded(
                    measure_inference, device, cfg, args.inference_frames, device, precision, args.steps, args.warmup)})
                if args.ig_steps:
                    record["ig"].append({"variant": name, "attention": attention, **_guarded(
                        measure_ig, device, cfg, args.inference_frames, device, precision, args.ig_steps, args.ig_batch)})
            save_record(record, args.json)
    return record


def _format_row(row: dict) -> str:
    head = f"{row['variant']:<14} {row['attention']:<8} {row['frames']:>5}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}: {row.get('error', '')}"
    peak = f"{row['peak_gib']:8.2f}" if "peak_gib" in row else f"{'-':>8}"
    flops = f"{row['flops']['total'] / 1e12:9.3g}" if "flops" in row else f"{'-':>9}"
    mfu = f"{100 * row['mfu']:6.1f}" if "mfu" in row else f"{'-':>6}"
    return f"{head} {row['step_ms']:10.1f} {row['samples_per_s']:9.2f} {peak} {flops} {mfu}"


def format_report(record: dict) -> str:
    """The record as a plain-text table."""
    v = record["versions"]
    lines = [f"device {v.get('GPU', v['device'])}, torch {v['torch']}, CUDA {v['torch CUDA']}, cuDNN {v['cuDNN']}, "
             f"mamba-ssm {v['mamba-ssm']}, causal-conv1d {v['causal-conv1d']}; {record['precision']}, "
             f"batch {record['batch']}, median of {record['steps']} steps after {record['warmup']}",
             f"{'variant':<14} {'scope':<8} {'T':>5} {'step ms':>10} {'samples/s':>9} {'peak GiB':>8} {'TFLOP':>9} {'MFU %':>6}"]
    lines += [_format_row(r) for r in record["settings"]]
    for fit in record["fits"]:
        lines.append(f"memory fit {fit['variant']} {fit['attention']}: {fit['slope_gib_per_frame']:.4f} GiB/frame + "
                     f"{fit['intercept_gib']:.2f} GiB, R² {fit['r2']:.4f} (T = {fit['frames']})")
    for item in record["inference"]:
        text = f"{item['ms']:.1f} ms" if item["status"] == "ok" else item["status"]
        lines.append(f"inference {item['variant']} {item['attention']}: {text} per subject window")
    for item in record["ig"]:
        text = (f"{item['seconds']:.2f} s ({item['n_steps']} steps, internal batch {item['internal_batch_size']})"
                if item["status"] == "ok" else f"{item['status']}: {item.get('error', '')}")
        lines.append(f"integrated gradients {item['variant']} {item['attention']}: {text} per subject window")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m brainmt.bench.model", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper", help="config name or YAML file (default paper)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides for every setting")
    p.add_argument("--frames", nargs="+", type=int, default=[50, 100, 200, 400, 800, 1200])
    p.add_argument("--attention", nargs="+", choices=list(literal_values(AttentionScope)),
                   default=["global", "spatial"])
    p.add_argument("--checkpointing", choices=config_choices(ModelConfig, "checkpointing"), default=None,
                   help="model.checkpointing (default: the config's)")
    p.add_argument("--compile", action="store_true", help="model.compile=true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME KEY=VALUE",
                   help="a named set of model overrides (repeatable), e.g. --variant plain fused_kernels=false")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=list(literal_values(Device)), default="auto",
                   help="auto: the GPU when torch sees one, else the CPU")
    p.add_argument("--precision", choices=config_choices(TrainConfig, "precision"), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak for MFU (default: from its name)")
    p.add_argument("--inference-frames", type=int, default=200, help="frames of the inference and IG window (0: skip)")
    p.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps (0: skip)")
    p.add_argument("--ig-batch", type=int, default=5, help="scaled inputs per IG forward/backward pass")
    p.add_argument("--no-extras", action="store_true", help="skip inference and IG")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a torch.profiler table per setting here")
    p.add_argument("--json", default="bench-model.json", help="where to write the record (default bench-model.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the JSON record."""
    args = parse_args(argv)
    record = run(args)
    print(format_report(record))
    if args.json:
        save_record(record, args.json)
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    main()
