"""``brainmt baseline``: the connectivity baselines on the same shards and splits as BrainMT."""

from __future__ import annotations

import argparse

from brainmt.config import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``brainmt baseline``."""
    from brainmt.baseline.fit import METHODS

    p = sub.add_parser("baseline", help="connectome baselines (parcellation, Fisher-z correlations, L2 models)")
    p.add_argument("--shards", required=True, help="shard directory (its splits.json: the same split as BrainMT)")
    p.add_argument("--task", required=True, choices=["sex", "regression"], help="sex: classification; regression: a score")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--target", help="phenotype column (default: sex, or cognition for regression)")
    p.add_argument("--out", required=True, help="output directory: predictions.csv, metrics.json, baseline.json")
    p.add_argument("--atlas", help="integer-labelled parcellation NIfTI in the scans' space (default: built-in cubes)")
    p.add_argument("--atlas-labels", help="its label file ('<integer> <name>' lines, or a CSV/TSV)")
    p.add_argument("--parcel-mm", type=float, default=25.0, help="edge of the built-in cubes in MNI mm")
    p.add_argument("--split", default="test")
    p.set_defaults(func=cmd_baseline)


def cmd_baseline(args: argparse.Namespace) -> int:
    """Fit the baseline, print the metrics table."""
    from brainmt.baseline.fit import METHODS, run_baseline
    from brainmt.train.metrics import format_table

    task = "classification" if args.task == "sex" else "regression"
    if METHODS[args.method][1] != task:
        raise ConfigError(f"--method: {args.method} is a {METHODS[args.method][1]} method; --task {args.task} needs one "
                          f"of {', '.join(m for m, (_, t) in METHODS.items() if t == task)}")
    from brainmt.analysis.regions import AtlasError

    try:
        result = run_baseline(args.shards, args.method, args.out, target=args.target, atlas=args.atlas,
                              atlas_labels=args.atlas_labels, parcel_mm=args.parcel_mm, split=args.split)
    except AtlasError as exc:
        raise ConfigError(f"--atlas: {exc}") from None
    metrics = {k: v for k, v in result.items() if isinstance(v, dict)}
    print(format_table(metrics, f"{args.method} on '{result['target']}', {args.split} split ({result['subjects']} "
                                f"subjects), penalty {result['penalty']:g} chosen on validation"))
    print(f"written: {args.out}/predictions.csv, metrics.json, baseline.json")
    return 0
