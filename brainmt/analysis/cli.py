"""``brainmt analyze``: Integrated Gradients maps of a trained run (subjects, then the group), in one process."""

from __future__ import annotations

import argparse
import logging
import sys

from brainmt.config import AnalysisConfig, Config, ConfigError, config_choices, load_config, validate

log = logging.getLogger("brainmt.analysis")
# command-line option -> config key (each set through set_value, then checked by validate)
OPTION_KEYS = {"checkpoint": "analysis.checkpoint", "split": "analysis.split", "steps": "analysis.steps",
               "baseline": "analysis.baseline", "method": "analysis.method",
               "internal_batch_size": "analysis.internal_batch_size", "device": "analysis.device",
               "atlas": "analysis.atlas", "atlas_labels": "analysis.atlas_labels", "top": "analysis.top_regions",
               "figure_percentile": "analysis.figure_percentile", "subject_figures": "analysis.subject_figures",
               "smooth_fwhm": "analysis.smooth_fwhm"}


def _choices(key: str) -> list:
    """The allowed values of an ``analysis`` key (its ``Literal`` type in the config): the option's choices."""
    return config_choices(AnalysisConfig, key)


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """The options ``brainmt analyze`` and ``jobs/analyze.py`` share: what to analyse and how."""
    p.add_argument("--run", required=True, help="run directory (its checkpoints/ and config)")
    p.add_argument("--out", help="output directory (default RUN/ig)")
    p.add_argument("--shards", help="shard directory (default: the run's)")
    p.add_argument("--checkpoint", help="best | last | PATH (default best)")
    p.add_argument("--split", choices=_choices("split"), help="split whose subjects are analysed (default test)")
    p.add_argument("--subjects", nargs="+", metavar="ID", help="only these subjects (default: all of the split)")
    p.add_argument("--steps", type=int, help="IG path steps (default 32)")
    p.add_argument("--baseline", choices=_choices("baseline"),
                   help="IG baseline (default auto: noise for a model that centres its input, else mean)")
    p.add_argument("--method", choices=_choices("method"), help="IG quadrature (default gausslegendre)")
    p.add_argument("--internal-batch-size", type=int, metavar="B",
                   help="scaled inputs through the model at once (default: chosen from the free memory)")
    p.add_argument("--device", choices=_choices("device"), help="default auto: a GPU when there is one")
    p.add_argument("--atlas", metavar="NAME|PATH",
                   help="region table atlas: lobes (built-in, the default), harvard-oxford, harvard-oxford-sub, aal, "
                        "schaefer-100 ... schaefer-1000 (add -17 for 17 networks; fetched by nilearn into its data "
                        "directory), or an integer-labelled NIfTI in the scans' space")
    p.add_argument("--atlas-labels", help="label file of a NIfTI atlas (TSV/CSV, FSL XML, lookup table, or one name a line)")
    p.add_argument("--top", type=int, help="regions printed and charted (default 20)")
    p.add_argument("--figure-percentile", type=float, metavar="P",
                   help="nilearn figures draw the voxels whose |value| reaches this percentile of the map's brain "
                        "voxels (default 90)")
    p.add_argument("--subject-figures", type=int, metavar="N",
                   help="nilearn figures of the first N analysed subjects' signed maps (default 4; 0: none)")
    p.add_argument("--smooth-fwhm", type=float, metavar="MM",
                   help="the group maps average subject maps smoothed by a Gaussian of this FWHM (default 6; 0: none)")
    p.add_argument("--config", action="append", help="YAML layers whose 'analysis:' section sets the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. analysis.baseline_scans=32")


def config_from_args(args: argparse.Namespace, extra_layers: list[str] | None = None) -> Config:
    """The config whose ``analysis`` section holds the settings: schema defaults, then the --config layers (and
    ``extra_layers``, e.g. a cluster profile) and overrides, then the options given."""
    from brainmt.launch.cli import apply_options

    layers = list(args.config or []) + list(extra_layers or [])
    cfg = load_config(layers or None, args.overrides)
    apply_options(cfg, OPTION_KEYS, args, validate)   # e.g. --steps 0: "analysis.steps: must be at least 1 (given as --steps 0)"
    return cfg


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``brainmt analyze``."""
    p = sub.add_parser("analyze", help="Integrated Gradients: subject and group brain maps, region table, figures",
                       description=__doc__)
    add_analysis_options(p)
    from brainmt.cli import add_verify_option

    add_verify_option(p)
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--maps-only", action="store_true", help="subject maps only, no group step (array tasks)")
    stage.add_argument("--group-only", action="store_true", help="only the group step, from existing subject maps")
    p.add_argument("--truth", metavar="DIR",
                   help="a synthetic cohort's derivatives/planted folder (brainmt synth): score the group |IG| map, "
                        "the contrast map and the class means against the target's truth mask and the control "
                        "region; writes truth.json")
    p.set_defaults(func=cmd_analyze)


def _score_truth(summary: dict, planted: str) -> None:
    """``--truth``: the group |IG| map (and the net, contrast and class-mean maps) against the planted truth, to
    truth.json beside it."""
    from pathlib import Path

    from brainmt.analysis.truth import truth_scores, truth_text
    from brainmt.fileio import atomic_write_json

    maps = {Path(f).name: Path(f) for f in summary["maps"]}
    group_map = maps["group_mean_abs_ig.nii.gz"]
    class_means = [path for name, path in sorted(maps.items())
                   if name.endswith("_mean_ig.nii.gz") and name != "group_mean_ig.nii.gz"]
    scores = truth_scores(group_map, planted, summary["target"], maps.get("group_contrast_ig.nii.gz"), class_means,
                          maps.get("group_mean_abs_net_ig.nii.gz"))
    atomic_write_json(group_map.parent / "truth.json", scores)
    print(truth_text(scores), flush=True)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Run the analysis; exit 1 on an error or when a subject failed (the others' maps are kept).

    A config error, or a run without checkpoints (CheckpointError), is reported by brainmt's main."""
    from brainmt.analysis.atlases import check_atlas
    from brainmt.analysis.group import merge, summary_text
    from brainmt.analysis.pipeline import analyze_subjects
    from brainmt.cli import run_shards, verify_or_report

    if args.verify and not verify_or_report(run_shards(args.run, args.shards), "brainmt analyze"):
        return 1
    try:
        settings = config_from_args(args).analysis
        failed: dict = {}
        if not args.maps_only and not args.group_only:
            check_atlas(settings.atlas, settings.atlas_labels)   # a bad or unavailable atlas stops before the subjects
        if args.truth:
            from brainmt.analysis.truth import read_truth

            read_truth(args.truth)                                 # and so does a --truth that is not a planted folder
        if not args.group_only:
            result = analyze_subjects(args.run, args.out, settings, args.subjects, args.shards)
            failed = result["failed"]
            print(f"subject maps: {len(result['done'])} written, {len(result['already_done'])} already there, "
                  f"{len(failed)} failed ({result['seconds']:.1f} s"
                  + (f"; internal batch size {result['internal_batch_size']} on {result['device']})" if result["done"]
                     else ")"), flush=True)
            for subject, error in failed.items():
                print(f"FAILED subject {subject}: {error}", file=sys.stderr)
            if args.maps_only:
                return 0          # failures are recorded in <subject>_error.json; the group step reports them
        summary = merge(args.run, args.out, settings, args.subjects, args.shards)
        print(summary_text(summary, settings.top_regions), flush=True)
        if args.truth:
            _score_truth(summary, args.truth)
        return 1 if summary["failed"] or summary["missing"] or failed else 0
    except ConfigError:
        raise                     # brainmt's main reports it and exits 2
    except (ValueError, OSError) as exc:
        print(f"brainmt analyze: error: {exc}", file=sys.stderr)
        return 1
