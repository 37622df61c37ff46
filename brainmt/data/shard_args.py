"""The sharding options of ``brainmt shard`` and ``jobs/shard.py``, declared once and read once.

:func:`add_shard_options` adds them to a parser (defaults from :class:`~brainmt.data.shards.ShardOptions`);
:func:`shard_arguments` turns the parsed options into the checked ``ShardOptions`` and the keyword
arguments of :func:`~brainmt.data.shards.shard_dataset`. Importing this module is cheap: the sharding code
is imported when a parser is built.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from brainmt.data.shards import ShardOptions

# the command line refuses an empty split (training or evaluating on one fails); ShardOptions' own default, 0,
# only warns (small test data)
CLI_MIN_SPLIT_SUBJECTS = 1
# parsed options passed to shard_dataset as keyword arguments (the others make the ShardOptions)
DATASET_KEYWORDS = ("layout", "glob", "subject_regex", "bids_space", "mask", "id_column", "targets", "sex_column",
                    "family_column")


def _add_source_options(g: argparse._ArgumentGroup) -> None:
    """Where the scans and their phenotype columns are: layout, file pattern, BIDS space, columns."""
    from brainmt.data.layouts import LAYOUTS

    g.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                   help="directory layout of --input (default auto: BIDS, UK Biobank or HCP, whichever is found)")
    g.add_argument("--glob", help="with --layout glob: file pattern relative to --input")
    g.add_argument("--subject-regex", help="with --glob: regex on the relative path; group 'subject' or group 1")
    g.add_argument("--bids-space", help="BIDS/fMRIPrep: the space- entity to use (default: MNI*)")
    g.add_argument("--id-column", help="subject id column of --phenotypes (default: participant_id, eid, ...)")
    g.add_argument("--targets", nargs="+", help="target columns (default: sex + every numeric column; a subject "
                                                "missing any target is skipped)")
    g.add_argument("--sex-column", help="sex column, coded M/F, male/female or 0/1 (default: sex or gender)")
    g.add_argument("--family-column", help="family column: a family never spans two splits (default: family_id)")


def add_shard_options(p: argparse.ArgumentParser) -> None:
    """Add every sharding option (scans, mask, storage, splits) with its default and help to ``p``."""
    from brainmt.data.shards import ShardOptions

    d = ShardOptions()
    g = p.add_argument_group("sharding options (the same in brainmt shard and jobs/shard.py)")
    _add_source_options(g)
    g.add_argument("--mask", help="brain mask NIfTI (default: computed from the data)")
    g.add_argument("--mask-fraction", type=float, default=d.mask_fraction,
                   help="without --mask: keep the voxels that vary over time in at least this fraction of the scans "
                        "(0 < F <= 1; default %(default)s)")
    g.add_argument("--mask-scans", type=int, help="compute the mask from at most this many scans (default: all)")
    g.add_argument("--chunk-frames", type=int, default=d.chunk_frames,
                   help="frames per stored chunk (default %(default)s)")
    g.add_argument("--shard-size-gb", type=float, default=d.shard_bytes / 1e9,
                   help="start a new shard file when one would grow past this size (GB; default %(default)g; a scan "
                        "is never split between two shards)")
    g.add_argument("--background", choices=["min", "zero"], default=d.background,
                   help="value outside the brain: the scan's minimum z-score (min, the paper) or 0 (default %(default)s)")
    g.add_argument("--min-frames", type=int, default=d.min_frames,
                   help="scans with fewer frames are skipped (default %(default)s)")
    g.add_argument("--split", type=float, nargs=3, default=list(d.split_fractions), metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of subjects (>= 0, summing to 1) in the train, validation and test splits "
                        "(default %(default)s)")
    g.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the subject splits (default %(default)s)")
    g.add_argument("--min-split-subjects", type=int, default=CLI_MIN_SPLIT_SUBJECTS,
                   help="refuse splits (of a fraction above 0) with fewer subjects than this (default %(default)s; "
                        "0 allows an empty split)")
    g.add_argument("--strict", action="store_true", help="stop at the first bad scan instead of skipping it")


def shard_arguments(args: argparse.Namespace) -> tuple[ShardOptions, dict]:
    """The checked ShardOptions and the shard_dataset keyword arguments of parsed sharding options.

    Raises ShardOptionError (a usage error: exit status 2) naming every option whose value cannot work."""
    from brainmt.data.shards import ShardOptionError, ShardOptions

    if not math.isfinite(args.shard_size_gb):   # nan, inf: no size in bytes (the others: opts.check)
        raise ShardOptionError(f"--shard-size-gb {args.shard_size_gb:g}: must be a number more than 0")
    opts = ShardOptions(chunk_frames=args.chunk_frames, shard_bytes=int(args.shard_size_gb * 1e9),
                        background=args.background, min_frames=args.min_frames, mask_fraction=args.mask_fraction,
                        mask_scans=args.mask_scans, split_fractions=tuple(args.split), split_seed=args.split_seed,
                        strict=args.strict, min_split_subjects=args.min_split_subjects)
    opts.check()
    return opts, {key: getattr(args, key) for key in DATASET_KEYWORDS}


def shard_option_argv(args: argparse.Namespace) -> list[str]:
    """The sharding options of ``args`` that differ from their defaults, as command-line words (``brainmt shard ...``)."""
    p = argparse.ArgumentParser(add_help=False)
    add_shard_options(p)
    words: list[str] = []
    for action in p._actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return words
