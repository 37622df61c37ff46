"""The ``brainmt`` command line: ``brainmt <subcommand> --help``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from brainmt.config import ConfigError, config_to_dict, load_config


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
    """Train the debug model on synthetic scans through submitit's local executor."""
    from brainmt.demo import submit_demo

    cfg = _load(args, "demo")
    run_dir = Path(args.run_dir).resolve()
    metrics = submit_demo(cfg, run_dir, args.steps, cluster=args.cluster)
    print(json.dumps(metrics, indent=2))
    print(f"run directory: {run_dir}")
    ok = metrics["val_mse"] < metrics["val_mse_of_mean_predictor"]
    print("the model beat the mean predictor on held-out subjects" if ok
          else "the model did NOT beat the mean predictor on held-out subjects")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainmt`` console script."""
    parser = argparse.ArgumentParser(prog="brainmt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the resolved config and the model's parameters")
    _add_config_args(p, "paper")
    p.add_argument("--params-only", action="store_true", help="print only the parameter breakdown")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="end-to-end demo on synthetic scans (CPU, seconds)")
    _add_config_args(p, "demo")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--cluster", choices=["local", "debug"], default="local",
                   help="submitit executor: local (a separate process) or debug (in-process)")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"brainmt: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
