"""The ``brainmt`` command line: ``brainmt <subcommand> --help``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from brainmt.config import SPLIT_NAMES, ConfigError, Device, LocalCluster, config_to_dict, literal_values, load_config


def _add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", action="append", default=None,
                   help=f"YAML config file or built-in name (paper, debug, demo); repeat to layer; default {default}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.embed_dim=64")


def _load(args: argparse.Namespace, default: str):
    return load_config(args.config or [default], args.overrides)


def cmd_info(args: argparse.Namespace) -> int:
    """Print the resolved config and the model's parameter breakdown."""
    import yaml

    from brainmt.models import build_model, parameter_breakdown

    cfg = _load(args, "paper")
    if not args.params_only:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    model = build_model(cfg.model)
    print(f"BrainMT ({cfg.name}): token grid {'x'.join(map(str, model.grid))} = {model.num_spatial_tokens} tokens a frame")
    for name, count in parameter_breakdown(model).items():
        print(f"  {name:40s} {count:>12,}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic scans -> shards -> train and evaluate the demo configuration through submitit."""
    from brainmt.demo import submit_demo
    from brainmt.train.metrics import format_table

    cfg = _load(args, "demo")   # checked here, before any data is written
    work_dir = Path(args.work_dir).resolve()
    ev = submit_demo(args.config or ["demo"], args.overrides, work_dir, cluster=args.cluster, subjects=args.subjects,
                     seed=cfg.train.seed)
    if not ev:
        print("training was interrupted; run `brainmt demo` again to resume")
        return 3
    metrics = {k: v for k, v in ev.items() if isinstance(v, dict)}
    print(format_table(metrics, f"demo, {ev['split']} split ({ev['subjects']} held-out subjects), "
                                f"task {ev['task']} on '{ev['target']}':"))
    run_dir = work_dir / "run"
    print(f"run directory: {run_dir}\n  curves: {run_dir / 'curves.png'}\n  predictions: {run_dir / 'predictions.csv'}"
          f"\n  metrics: {run_dir / 'metrics.json'}")
    key = "auroc" if ev["task"] == "classification" else "pearson_r"
    target = 0.8 if key == "auroc" else 0.5
    ok = ev[key]["value"] >= target
    print(f"the model learned the planted effect ({key} {ev[key]['value']:.3f} >= {target})" if ok
          else f"the model did NOT learn the planted effect ({key} {ev[key]['value']:.3f} < {target})")
    return 0 if ok else 1


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic BIDS dataset with planted effects (bad arguments: exit 2 before anything is written)."""
    from brainmt.data.synthetic import SynthArgumentError, check_synth_args, write_synthetic_bids

    try:
        check_synth_args(args.out, args.subjects, args.frames, args.shape, args.effect, args.lag)
    except SynthArgumentError as exc:
        flag = "out" if exc.option == "out" else f"--{exc.option}"
        print(f"brainmt synth: error: argument {flag}: {exc.message}", file=sys.stderr)
        return 2
    out = write_synthetic_bids(args.out, args.subjects, args.frames, args.shape, seed=args.seed, tr=args.tr,
                               workers=args.workers, effect=args.effect, lag=args.lag)
    print(f"wrote {args.subjects} synthetic scans ({'x'.join(map(str, args.shape))}, {args.frames} frames, "
          f"effect {args.effect}) to {out}")
    print(f"phenotypes: {out / 'participants.tsv'}; planted regions and truth masks: {out / 'derivatives' / 'planted'}")
    return 0


def add_shard_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``brainmt shard``: the shared sharding options plus its own input, output and part options."""
    from brainmt.data.shard_args import add_shard_options
    from brainmt.launch.cli import parse_part

    p = sub.add_parser("shard", help="NIfTI scans + phenotypes -> WebDataset shards, manifest.json, splits.json")
    p.add_argument("--input", help="directory of scans")
    p.add_argument("--phenotypes", help="participants table: .tsv (tab-separated) or .csv (comma-separated)")
    p.add_argument("--output", required=True, help="shard directory")
    add_shard_options(p)
    p.add_argument("--mask-only", action="store_true", help="compute and save mask.nii.gz, then stop")
    p.add_argument("--part", type=parse_part, default=(0, 1), help="i/n: write slice i of n (the array tasks of jobs/shard.py)")
    p.add_argument("--merge", action="store_true", help="gather finished parts into manifest.json and splits.json")
    p.add_argument("--resplit", action="store_true", help="with --merge: rewrite splits.json")
    p.set_defaults(func=cmd_shard)


def cmd_shard(args: argparse.Namespace) -> int:
    """NIfTI scans + phenotypes -> WebDataset shards, manifest and splits."""
    from brainmt.data.layouts import LayoutError
    from brainmt.data.nifti import ScanError
    from brainmt.data.phenotypes import PhenotypeError
    from brainmt.data.shard_args import shard_arguments
    from brainmt.data.shards import ShardError, ShardOptionError, merge_manifest, shard_dataset

    try:
        opts, dataset_args = shard_arguments(args)   # every option before any work: a usage error exits 2
        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise ShardOptionError(f"--output {args.output}: exists and is not a directory")
    except ShardOptionError as exc:
        print(f"brainmt shard: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.merge:
            print(f"manifest: {merge_manifest(args.output, opts, resplit=args.resplit)}")
            return 0
        if not args.input or not args.phenotypes:
            print("brainmt shard: --input and --phenotypes are required (unless --merge)", file=sys.stderr)
            return 2
        summary = shard_dataset(args.input, args.phenotypes, args.output, part=args.part, mask_only=args.mask_only,
                                options=opts, **dataset_args)
    except (ShardError, ScanError, PhenotypeError, LayoutError) as exc:
        print(f"brainmt shard: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ShardOptionError) else 1
    print(summary.text())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every shard against manifest.json (presence, size, SHA-256); name the damaged samples by CRC32."""
    return 0 if verify_or_report(args.shards, "brainmt verify") else 1


def verify_or_report(shards: str | Path, who: str) -> bool:
    """``brainmt verify`` of ``shards``: True when every shard matches manifest.json, else the problems printed."""
    from brainmt.data.shards import verify_shards

    checked, problems = verify_shards(shards)
    for problem in problems:
        print(f"{who}: {problem}", file=sys.stderr)
    if problems:
        print(f"{who}: {len(problems)} bad or missing file(s) in {shards}; nothing was run", file=sys.stderr)
        return False
    print(f"{shards}: every shard matches manifest.json ({checked / 1e9:.3f} GB checked)", flush=True)
    return True


def add_verify_option(p: argparse.ArgumentParser) -> None:
    """``--verify``: check the shards' SHA-256 and CRC32s (as ``brainmt verify``) before any work."""
    p.add_argument("--verify", action="store_true",
                   help="check every shard against manifest.json (SHA-256, chunk CRC32s) first, as brainmt verify")


def run_shards(run_dir: str | Path, shards: str | None) -> str | None:
    """The shard directory a command on a trained run reads: ``shards``, else the run's own."""
    if shards:
        return shards
    from brainmt.config import load_config

    path = Path(run_dir) / "config.yaml"
    return load_config(path).data.shards if path.exists() else None


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a run, then evaluate its best checkpoint on the test split."""
    from brainmt.signals import INTERRUPTED_EXIT
    from brainmt.train.loop import run

    cfg = _load(args, "paper")
    if args.verify and not verify_or_report(args.shards or cfg.data.shards, "brainmt train"):
        return 1
    result = run(cfg, args.shards, args.run_dir, evaluate_split=None if args.no_evaluate else args.split)
    print(f"training {result['status']} at step {result['step']}/{result['total_steps']}; run directory {args.run_dir}")
    return 0 if result["status"] != "interrupted" else INTERRUPTED_EXIT


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run's checkpoint on a split."""
    from brainmt.train.evaluation import evaluate

    if args.verify and not verify_or_report(run_shards(args.run, args.shards), "brainmt evaluate"):
        return 1
    evaluate(args.run, args.split, args.checkpoint, args.shards, force=args.force)
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    """The container's %test: versions, kernels and a small training step (brainmt.selftest)."""
    from brainmt.selftest import run

    return run(args.device, args.require_kernels)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainmt`` console script."""
    parser = argparse.ArgumentParser(prog="brainmt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the resolved config and the model's parameters")
    _add_config_args(p, "paper")
    p.add_argument("--params-only", action="store_true", help="print only the parameter breakdown")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="end to end on synthetic scans: synth, shard, train, evaluate (CPU, about a minute)")
    _add_config_args(p, "demo")
    p.add_argument("--work-dir", default="runs/demo", help="data, shards and run directory of the demo")
    p.add_argument("--subjects", type=int, default=300)
    p.add_argument("--cluster", choices=list(literal_values(LocalCluster)), default="local",
                   help="submitit executor: local (a separate process) or debug (in-process)")
    p.set_defaults(func=cmd_demo)
    from brainmt.data.synthetic import DEFAULT_LAG, EFFECTS

    p = sub.add_parser("synth", help="write synthetic scans with planted effects (BIDS layout)")
    p.add_argument("out")
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--shape", type=int, nargs=3, default=[48, 56, 48], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tr", type=float, default=0.735)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--effect", choices=EFFECTS, default="mixed",
                   help="kind of planted effect: mixed (amplitude + coupling), amplitude, coupling or lagged")
    p.add_argument("--lag", type=int, default=DEFAULT_LAG, help="with --effect lagged: the lag in frames")
    p.set_defaults(func=cmd_synth)
    add_shard_parser(sub)
    p = sub.add_parser("verify", help="check every shard against manifest.json: presence, size, SHA-256")
    p.add_argument("--shards", required=True, help="shard directory (brainmt shard --output)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("train", help="train or resume a run (the one training entry point)")
    _add_config_args(p, "paper")
    p.add_argument("--shards", help="shard directory (default: data.shards of the config)")
    p.add_argument("--run-dir", required=True, help="run directory; an existing one is resumed")
    p.add_argument("--split", default="test", choices=list(SPLIT_NAMES), help="split evaluated after training (default test)")
    p.add_argument("--no-evaluate", action="store_true")
    add_verify_option(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="metrics and per-subject predictions of a run on a split")
    p.add_argument("--run", required=True, help="run directory (brainmt train --run-dir)")
    p.add_argument("--split", default="test", choices=list(SPLIT_NAMES), help="split of splits.json to evaluate (default test)")
    p.add_argument("--checkpoint", default="best", help="best | last | PATH")
    p.add_argument("--shards", help="shard directory (default: the run's)")
    p.add_argument("--force", action="store_true",
                   help="replace the split's metrics and predictions even if they came from another checkpoint or shards")
    add_verify_option(p)
    p.set_defaults(func=cmd_evaluate)
    from brainmt.analysis.cli import add_parser as add_analyze_parser
    from brainmt.baseline.cli import add_parser as add_baseline_parser
    from brainmt.predict import add_parser as add_predict_parser

    add_analyze_parser(sub)
    add_baseline_parser(sub)
    add_predict_parser(sub)
    p = sub.add_parser("selftest", help="check the install: versions, the CUDA kernels if a GPU is visible, a training step")
    p.add_argument("--device", choices=list(literal_values(Device)), default="auto")
    p.add_argument("--require-kernels", action="store_true", help="fail unless the compiled Mamba kernels run")
    p.set_defaults(func=cmd_selftest)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from brainmt.data.shards import ShardError
    from brainmt.train.checkpoint import CheckpointError
    from brainmt.train.loop import TrainingError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"brainmt: config error: {exc}", file=sys.stderr)
        return 2
    except (ShardError, CheckpointError, TrainingError) as exc:
        print(f"brainmt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
