"""Loader benchmark at full size: storage, bytes read per sample, samples/s and MB/s per worker.

``python -m brainmt.bench.loader [--subjects 3 --frames 490 --shape 91 109 91 --num-frames 200]``
writes synthetic scans, shards them, then reads training samples through a DataLoader with
``--workers`` worker processes (dense (T, 1, D, H, W) float16, as training uses them) and prints a
table; ``--json FILE`` writes the numbers.

``--checks none crc crc-always`` measures the per-read checks (``ShardSet(check=...)``): each is measured ``--rounds``
times, interleaved (so that a drift of the machine's speed hits all alike); the table gives the median samples/s
and CPU ms a sample (all processes: what a busy shared machine does not change) and their cost against ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CHECKS = ("default", "none", "finite", "crc", "crc-always")


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _prepare(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Write (or reuse) the synthetic scans and shard them; return (work dir, shard dir, timings)."""
    from brainmt.data.shards import ShardOptions, shard_dataset
    from brainmt.data.synthetic import write_synthetic_bids

    work = Path(args.workdir or tempfile.mkdtemp(prefix="brainmt-bench-"))
    raw, out = work / "raw", work / "shards"
    t0 = time.perf_counter()
    if not (raw / "participants.tsv").exists():
        write_synthetic_bids(raw, args.subjects, args.frames, args.shape, seed=0, workers=1, compress=False)
    t_synth = time.perf_counter() - t0
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    shard_dataset(raw, raw / "participants.tsv", out, options=ShardOptions(
        min_frames=args.num_frames, chunk_frames=args.chunk_frames, split_fractions=(1.0, 0.0, 0.0)), progress=False)
    return work, out, {"synth_seconds": round(t_synth, 1), "shard_seconds": round(time.perf_counter() - t0, 1)}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _measure(shards, scans: list[str], args: argparse.Namespace, align: str,
             dense: bool) -> tuple[float, float, int, int]:
    """Read ``--samples`` training samples through a DataLoader: (seconds, CPU seconds, bytes read, bytes used).

    The CPU seconds (every process, warm-up and prefetched samples included) do not depend on what else the
    machine runs, as the seconds do: compare checks by them on a shared machine."""
    from torch.utils.data import DataLoader

    from brainmt.data.loader import TrainStream

    stream = TrainStream(shards, scans, args.num_frames, "cognition", seed=1, align=align, dense=dense)
    loader = DataLoader(stream, batch_size=None, num_workers=args.workers, persistent_workers=False,
                        prefetch_factor=2 if args.workers else None)
    cpu0 = _cpu_seconds()
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    used = read = 0
    t0 = time.perf_counter()
    for _ in range(args.samples):
        s = next(it)
        read += int(s["bytes_read"])
        used += args.num_frames * shards.n_brain * 2
    dt = time.perf_counter() - t0
    del it, loader
    return dt, _cpu_seconds() - cpu0, read, used


def run(args: argparse.Namespace) -> dict:
    """Generate, shard and read; return the measurements."""
    from brainmt.data.loader import ShardSet

    work, out, timings = _prepare(args)
    opened = {mode: ShardSet(out, **({} if mode == "default" else {"check": mode})) for mode in args.checks}
    shards = opened[args.checks[0]]
    scans = sorted(shards.scans)
    dense_bytes = len(scans) * args.frames * int(np.prod(args.shape)) * 2
    stored = sum(s["bytes"] for s in shards.manifest["shards"])
    cache_dropped = _drop_page_cache()
    results = {"device": "CPU (this machine)", "subjects": len(scans), "frames": args.frames,
               "shape": list(args.shape), "num_frames": args.num_frames, "chunk_frames": args.chunk_frames,
               "brain_voxels": shards.n_brain, "cropped_shape": list(shards.volume_shape),
               "storage_bytes": stored, "dense_fp16_bytes": dense_bytes, "storage_ratio": stored / dense_bytes,
               **timings, "page_cache_dropped": cache_dropped, "rounds": args.rounds, "runs": []}
    for align in ("chunk", "frame"):
        for dense in (True, False):
            rates: dict[str, list[float]] = {mode: [] for mode in args.checks}
            cpu: dict[str, list[float]] = {mode: [] for mode in args.checks}
            for _ in range(args.rounds):
                for mode in args.checks:
                    dt, cpu_s, read, used = _measure(opened[mode], scans, args, align, dense)
                    rates[mode].append(args.samples / dt)
                    cpu[mode].append(1e3 * cpu_s / (args.samples + args.warmup))
            for mode in args.checks:
                rate, ms = statistics.median(rates[mode]), statistics.median(cpu[mode])
                results["runs"].append({
                    "align": align, "output": "dense (T,1,D,H,W)" if dense else "packed (T,n_brain)",
                    "checks": mode, "workers": args.workers, "samples_per_s": rate, "samples_per_s_rounds": rates[mode],
                    "samples_per_s_per_worker": rate / max(1, args.workers), "cpu_ms_per_sample": ms,
                    "cpu_ms_per_sample_rounds": cpu[mode],
                    "MB_per_s": read / args.samples * rate / 1e6, "read_over_used": read / used,
                    "cost_vs_none": (1 - rate / statistics.median(rates["none"])) if "none" in rates else None,
                    "cpu_cost_vs_none": (ms / statistics.median(cpu["none"]) - 1) if "none" in cpu else None})
    if not args.keep and not args.workdir:
        shutil.rmtree(work)
    return results


def main() -> None:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--frames", type=int, default=490)
    p.add_argument("--shape", type=int, nargs=3, default=[91, 109, 91])
    p.add_argument("--num-frames", type=int, default=200)
    p.add_argument("--chunk-frames", type=int, default=10)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=["default"],
                   help="per-read sample checks to measure: default (the loader's), none, finite, crc, crc-always")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each --checks mode, interleaved; the median")
    p.add_argument("--workdir", help="keep generated data here (reused if present)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    r = run(args)
    print(f"{r['subjects']} scans of {'x'.join(map(str, r['shape']))} x {r['frames']} frames; samples of "
          f"{r['num_frames']} frames; chunks of {r['chunk_frames']}; {r['brain_voxels']} brain voxels; device: {r['device']}")
    print(f"storage / dense fp16: {r['storage_ratio']:.3f}   (synth {r['synth_seconds']} s, shard {r['shard_seconds']} s, "
          f"page cache dropped: {r['page_cache_dropped']}; median of {r['rounds']} round(s))")
    print(f"{'crop':6s} {'output':20s} {'checks':10s} {'workers':>7s} {'samples/s':>10s} {'per worker':>10s} {'MB/s':>8s} "
          f"{'read/used':>9s} {'cost':>7s} {'CPU ms':>8s} {'CPU cost':>8s}")
    pct = lambda v: "" if v is None else f"{100 * v:6.1f}%"  # noqa: E731
    for run_ in r["runs"]:
        print(f"{run_['align']:6s} {run_['output']:20s} {run_['checks']:10s} {run_['workers']:>7d} "
              f"{run_['samples_per_s']:>10.2f} {run_['samples_per_s_per_worker']:>10.2f} {run_['MB_per_s']:>8.0f} "
              f"{run_['read_over_used']:>9.3f} {pct(run_['cost_vs_none']):>7s} {run_['cpu_ms_per_sample']:>8.1f} "
              f"{pct(run_['cpu_cost_vs_none']):>8s}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
