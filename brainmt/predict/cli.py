"""``brainmt predict``: apply a trained run to new 4-D NIfTI scans, preprocessed as the run's shards were.

Every window of each scan goes through the run's checkpoint; ``OUT/predictions.csv`` has a row per subject and per
scan (target units for regression; probability and class for classification), ``windows.csv`` a row per window,
``skipped.csv`` the scans that could not be used and why. With ``--phenotypes`` the metrics of ``brainmt evaluate``
are printed and written to ``metrics.json``. A re-run into the same ``--out`` skips the scans already predicted.
"""

from __future__ import annotations

import argparse
import sys

from brainmt.config import Device, literal_values
from brainmt.data.layouts import LAYOUTS
from brainmt.launch.cli import parse_part


def add_predict_options(p: argparse.ArgumentParser) -> None:
    """The options ``brainmt predict`` and ``jobs/predict.py`` share: the run, the scans, the output and how."""
    p.add_argument("--run", required=True, help="run directory (brainmt train --run-dir): its checkpoints and config")
    p.add_argument("--input", help="directory of the new 4-D NIfTI scans")
    p.add_argument("--out", required=True, help="output directory (a re-run into it skips the scans already predicted)")
    p.add_argument("--checkpoint", default="best", help="best | last | PATH (default best)")
    p.add_argument("--shards", help="the run's shard directory, if it moved (its manifest.json and mask.nii.gz hold the "
                                    "preprocessing; default: the run's data.shards)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                   help="directory layout of --input, as brainmt shard reads it (default auto: BIDS, UK Biobank or HCP)")
    p.add_argument("--glob", help="with --layout glob: file pattern relative to --input")
    p.add_argument("--subject-regex", help="with --glob: regex on the relative path; group 'subject' or group 1")
    p.add_argument("--bids-space", help="BIDS/fMRIPrep: the space- entity to use (default: MNI*)")
    p.add_argument("--phenotypes", help="optional participants table (.tsv/.csv) with the run's target column: the "
                                        "metrics of brainmt evaluate are computed too")
    p.add_argument("--id-column", help="subject id column of --phenotypes (default: participant_id, eid, ...)")
    p.add_argument("--device", choices=list(literal_values(Device)), default="auto",
                   help="default auto: a GPU when there is one")
    p.add_argument("--resample", action="store_true",
                   help="resample scans not on the run's grid onto it (nibabel resample_from_to, trilinear) instead "
                        "of skipping them")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``brainmt predict``."""
    p = subparsers.add_parser("predict", help="apply a trained run to new 4-D NIfTI scans (no phenotypes needed)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_options(p)
    p.add_argument("--part", type=parse_part, default=(0, 1),
                   help="i/n: predict slice i of n of the scans (what task i of jobs/predict.py runs)")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--no-merge", action="store_true", help="predict only; leave the tables to a later --merge-only")
    stage.add_argument("--merge-only", action="store_true",
                       help="only write the tables (predictions.csv, ...) from what the parts predicted")
    p.set_defaults(func=run)


def request_from_args(args: argparse.Namespace):
    """The :class:`~brainmt.predict.core.PredictRequest` of parsed options."""
    from brainmt.predict.core import PredictRequest

    return PredictRequest(run=args.run, out=args.out, input=args.input, checkpoint=args.checkpoint, shards=args.shards,
                          layout=args.layout, glob=args.glob, subject_regex=args.subject_regex,
                          bids_space=args.bids_space, phenotypes=args.phenotypes, id_column=args.id_column,
                          device=args.device, resample=args.resample)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that stop a prediction with a message (a bad run, input, table or output), not a traceback."""
    from brainmt.config import ConfigError
    from brainmt.data.layouts import LayoutError
    from brainmt.data.nifti import ScanError
    from brainmt.data.phenotypes import PhenotypeError
    from brainmt.data.shards import ShardError
    from brainmt.predict.parts import PredictError
    from brainmt.train.checkpoint import CheckpointError

    return PredictError, LayoutError, PhenotypeError, ShardError, CheckpointError, ConfigError, ScanError, OSError


def run(args: argparse.Namespace) -> int:
    """Predict this part's scans, then write the tables; exit 1 when no scan could be predicted or on an error."""
    from brainmt.predict.core import run_part
    from brainmt.predict.merge import merge, part_summary, summary_text

    if not args.merge_only and not args.input:
        print("brainmt predict: error: --input DIR is required (unless --merge-only)", file=sys.stderr)
        return 2
    try:
        if not args.merge_only:
            print(part_summary(run_part(request_from_args(args), args.part)), flush=True)
            if args.no_merge:
                return 0
        summary = merge(args.out, args.phenotypes, args.id_column)
    except expected_errors() as exc:
        print(f"brainmt predict: error: {exc}", file=sys.stderr)
        return 1
    print(summary_text(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m brainmt.predict ...``: the same command as ``brainmt predict ...``."""
    import logging

    parser = argparse.ArgumentParser(prog="brainmt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
