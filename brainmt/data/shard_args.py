"""The sharding options of ``brainmt shard`` and ``jobs/shard.py``: each is a key of the config's ``shard:`` section.

:class:`~brainmt.config.ShardConfig` holds every option's default and type (choices as ``Literal`` types); each
option is its key of the same name (``--chunk-frames``: ``shard.chunk_frames``). :func:`add_shard_options` adds
them to a parser, with ``--config`` and ``shard.key=value`` overrides; :func:`shard_config` resolves the parsed
options: the defaults, then the ``shard:`` section of the ``--config`` layers and the overrides, then the options
given on the command line, each checked. :func:`shard_arguments` turns that into the
:class:`~brainmt.data.shards.ShardOptions` and the keyword arguments of :func:`~brainmt.data.shards.shard_dataset`.
Importing this module is cheap: the sharding code is imported when the options are resolved.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from brainmt.config import ConfigError, ShardConfig, config_choices, load_config, option_text, shard_problems

if TYPE_CHECKING:
    from brainmt.data.shards import ShardOptions

# shard.* keys passed to shard_dataset as keyword arguments (the others make the ShardOptions)
DATASET_KEYWORDS = ("layout", "glob", "subject_regex", "bids_space", "mask", "id_column", "targets", "sex_column",
                    "family_column")
OPTION_KEYS = tuple(f.name for f in dataclasses.fields(ShardConfig))   # option dest == shard.* key
DEFAULTS = ShardConfig()


def _default(key: str) -> str:
    """``default X`` for an option's help, X its ShardConfig default as typed on the command line."""
    return f"default {option_text(getattr(DEFAULTS, key))}"


def _add_source_options(g: argparse._ArgumentGroup) -> None:
    """Where the scans and their phenotype columns are: layout, file pattern, BIDS space, columns."""
    g.add_argument("--layout", choices=config_choices(ShardConfig, "layout"),
                   help=f"directory layout of --input ({_default('layout')}: BIDS, UK Biobank or HCP, whichever is found)")
    g.add_argument("--glob", help="with --layout glob: file pattern relative to --input")
    g.add_argument("--subject-regex", help="with --glob: regex on the relative path; group 'subject' or group 1")
    g.add_argument("--bids-space", help="BIDS/fMRIPrep: the space- entity to use (default: MNI*)")
    g.add_argument("--id-column", help="subject id column of --phenotypes (default: participant_id, eid, ...)")
    g.add_argument("--targets", nargs="+", help="target columns (default: sex + every numeric column; a subject "
                                                "missing any target is skipped)")
    g.add_argument("--sex-column", help="sex column, coded M/F, male/female or 0/1 (default: sex or gender)")
    g.add_argument("--family-column", help="family column: a family never spans two splits (default: family_id)")


def add_shard_options(p: argparse.ArgumentParser) -> None:
    """Add every sharding option (scans, mask, storage, splits), ``--config`` and overrides to ``p``.

    An option not given parses as None; :func:`shard_config` takes its value from the config (the defaults shown)."""
    g = p.add_argument_group("sharding options (the same in brainmt shard and jobs/shard.py; each is a shard.* "
                             "config key of the same name)")
    _add_source_options(g)
    g.add_argument("--mask", help="brain mask NIfTI (default: computed from the data)")
    g.add_argument("--mask-fraction", type=float,
                   help="without --mask: keep the voxels that vary over time in at least this fraction of the scans "
                        f"(0 < F <= 1; {_default('mask_fraction')})")
    g.add_argument("--mask-scans", type=int, help="compute the mask from at most this many scans (default: all)")
    g.add_argument("--chunk-frames", type=int, help=f"frames per stored chunk ({_default('chunk_frames')})")
    g.add_argument("--shard-size-gb", type=float,
                   help=f"start a new shard file when one would grow past this size (GB; {_default('shard_size_gb')}; "
                        "a scan is never split between two shards)")
    g.add_argument("--background", choices=config_choices(ShardConfig, "background"),
                   help=f"value outside the brain: the scan's minimum z-score (min, the paper) or 0 ({_default('background')})")
    g.add_argument("--min-frames", type=int, help=f"scans with fewer frames are skipped ({_default('min_frames')})")
    g.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help=f"fractions of subjects (>= 0, summing to 1) in the train, validation and test splits "
                        f"({_default('split')})")
    g.add_argument("--split-seed", type=int, help=f"seed of the subject splits ({_default('split_seed')})")
    g.add_argument("--min-split-subjects", type=int,
                   help=f"refuse splits (of a fraction above 0) with fewer subjects than this ({_default('min_split_subjects')}; "
                        "0 allows an empty split)")
    g.add_argument("--strict", action="store_true", default=None, help="stop at the first bad scan instead of skipping it")
    g.add_argument("--config", action="append", metavar="FILE",
                   help="YAML config (or built-in name) whose 'shard:' section sets these options; repeat to layer. "
                        "An option given here wins")
    p.add_argument("overrides", nargs="*", metavar="shard.key=value",
                   help="shard.* config overrides after the --config layers, e.g. shard.chunk_frames=20 (an option "
                        "given wins over both)")


def shard_config(args: argparse.Namespace) -> ShardConfig:
    """The sharding settings of parsed options: ShardConfig's defaults, the ``shard:`` section of the --config layers
    and the shard.* overrides, then each option given; every value checked.

    Raises ConfigError (naming the key) for a bad config or override, and ShardOptionError (a usage error: exit
    status 2) naming every option whose value cannot work."""
    from brainmt.data.shards import ShardOptionError

    config, overrides = getattr(args, "config", None), list(getattr(args, "overrides", None) or [])
    others = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("shard.")]
    if others:
        raise ConfigError(f"override {others[0]!r}: only shard.* keys set sharding options")
    settings = load_config(config or None, overrides).shard
    given = {key: getattr(args, key) for key in OPTION_KEYS if getattr(args, key, None) is not None}
    settings = dataclasses.replace(settings, **given)   # argparse has checked each option's type and choices
    problems = shard_problems(settings, as_options=True)   # a bad value here is one given on the command line
    if problems:
        raise ShardOptionError("; ".join(problems))
    return settings


def split_shard_config(settings: ShardConfig) -> tuple[ShardOptions, dict]:
    """The ShardOptions and the shard_dataset keyword arguments of checked sharding settings."""
    from brainmt.data.shards import ShardOptions

    return ShardOptions.from_config(settings), {key: getattr(settings, key) for key in DATASET_KEYWORDS}


def shard_arguments(args: argparse.Namespace) -> tuple[ShardOptions, dict]:
    """The checked ShardOptions and the shard_dataset keyword arguments of parsed sharding options (:func:`shard_config`)."""
    return split_shard_config(shard_config(args))


def shard_option_argv(settings: ShardConfig) -> list[str]:
    """The sharding settings that differ from their defaults, as command-line words (``brainmt shard ...``)."""
    p = argparse.ArgumentParser(add_help=False)
    add_shard_options(p)
    words: list[str] = []
    for action in p._actions:
        if action.dest not in OPTION_KEYS or not action.option_strings:
            continue
        value = getattr(settings, action.dest)
        if value == getattr(DEFAULTS, action.dest):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return words
