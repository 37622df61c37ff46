"""Config: built-ins, layering, overrides, round trip, and the errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from brainmt.config import Config, ConfigError, ShardConfig, load_config, save_config


def test_builtin_configs_load():
    paper = load_config("paper")
    assert paper.model.embed_dim == 512 and paper.model.mamba_depth == 12 and paper.model.attention_depth == 8
    assert paper.model.d_state == 16 and paper.model.expand == 2 and paper.optim.lr == pytest.approx(1e-4)
    # the recipe measured in issue 15 (docs/results.md); the tiny models keep the stem's GroupNorm and spatial attention
    assert paper.model.stem_norm == "none" and paper.data.num_frames == paper.model.num_frames == 20
    assert paper.model.attention == "global"
    assert paper.train.batch_size == 8 and paper.data.crop_align == "frame" and paper.model.head_norm == "none"
    debug = load_config("debug")
    assert debug.name == "debug" and debug.model.embed_dim == 32 and debug.model.stem_norm == "group"
    assert debug.model.attention == "spatial" and debug.data.crop_align == "chunk"
    assert debug.optim.weight_decay == pytest.approx(0.05)  # inherited from paper through base:
    assert load_config("demo").model.embed_dim == 32     # demo -> debug -> paper


def test_overrides_apply_and_parse_types():
    cfg = load_config("debug", ["model.embed_dim=64", "model.volume_shape=[16, 16, 16]",
                                "model.attention=global", "optim.lr=1e-3", "model.dt_rank=null", "train.seed=7"])
    assert cfg.model.embed_dim == 64 and cfg.model.volume_shape == [16, 16, 16]
    assert cfg.model.attention == "global" and cfg.optim.lr == pytest.approx(1e-3)
    assert isinstance(cfg.optim.lr, float) and cfg.model.dt_rank is None and cfg.train.seed == 7


def test_round_trip(tmp_path):
    cfg = load_config("paper", ["model.attention=global", "cluster.setup=['module load cuda']",
                                "sweep.space={model.mamba_depth: [6, 12]}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert save_config(again, tmp_path / "again.yaml").read_text() == path.read_text()


def test_layered_files_and_relative_base(tmp_path):
    (tmp_path / "site.yaml").write_text("base: debug\ncluster:\n  partition: gpu-a100\n  account: lab\n")
    (tmp_path / "run.yaml").write_text("base: site.yaml\nmodel:\n  mamba_depth: 3\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.cluster.partition == "gpu-a100" and cfg.model.mamba_depth == 3 and cfg.model.embed_dim == 32
    both = load_config([tmp_path / "site.yaml", "paper"])  # later files win
    assert both.model.embed_dim == 512 and both.cluster.partition == "gpu-a100"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.embd_dim=64", "unknown config key 'model.embd_dim'; did you mean 'embed_dim'"),
        ("modle.embed_dim=64", "unknown config key 'modle'"),
        ("model.embed_dim=abc", "model.embed_dim: expected an integer, got 'abc'"),
        ("model.embed_dim=6.5", "model.embed_dim: expected an integer"),
        ("model.bidirectional=maybe", "model.bidirectional: expected true or false"),
        ("model.attention=local", "model.attention: must be one of ['global', 'spatial', 'frame']"),
        ("model.volume_shape=[91, x, 91]", "model.volume_shape[1]: expected an integer"),
        ("model.volume_shape=91", "model.volume_shape: expected a list"),
        ("model=3", "model: expected a mapping"),
        ("model.embed_dim=100", "model.embed_dim: must be a positive multiple of model.num_heads"),
        ("model.embed_dim", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("paper", [override])
    assert message in str(err.value)


def test_bad_files_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'model\.depth'"):
        load_config(bad)
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.lr: expected a number, got 'fast'"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(bad)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular 'base:' chain"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_defaults_are_the_schema():
    assert load_config() == Config()


def test_every_bad_key_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: debug\nmodel:\n  embd_dim: 3\ntrain:\n  epochs: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["optim.lr=abc", "optim.betaz=1"])
    text = str(err.value)
    assert text.startswith("4 errors:")
    for part in ("model.embd_dim", "train.epochs: expected an integer", "optim.lr: expected a number", "optim.betaz"):
        assert part in text, part
    with pytest.raises(ConfigError) as err:                 # cross-field checks: all of them too
        load_config("debug", ["train.epochs=0", "optim.lr=-1", "cluster.nodes=0"])
    assert all(k in str(err.value) for k in ("train.epochs", "optim.lr", "cluster.nodes"))


# ------------------------------------------------------------------ the shard: section and the Literal choices


@pytest.mark.parametrize(
    "text, message",
    [
        ("shard:\n  background: bogus\n", "bad.yaml: shard.background: must be one of ['min', 'zero'], got 'bogus'"),
        ("shard:\n  layout: nifti\n", "shard.layout: must be one of ['auto', 'bids', 'ukb', 'hcp', 'glob']"),
        ("shard:\n  chunk_frames: ten\n", "bad.yaml: shard.chunk_frames: expected an integer, got 'ten'"),
        ("shard:\n  chunk_frames: 0\n", "shard.chunk_frames: must be at least 1, got 0"),
        ("shard:\n  split: [0.7, 0.7, 0.7]\n", "shard.split: the fractions must sum to 1 (they sum to 2.1)"),
        ("shard:\n  split: [0.5, 0.5]\n", "shard.split: needs three fractions (train, validation, test)"),
        ("shard:\n  shard_size_gb: .inf\n", "shard.shard_size_gb: must be a finite number more than 0, got inf"),
        ("shard:\n  mask_fraction: 1.5\n", "shard.mask_fraction: must be more than 0 and at most 1, got 1.5"),
        ("shard:\n  chunk_frams: 4\n", "unknown config key 'shard.chunk_frams'; did you mean 'chunk_frames'"),
    ],
)
def test_a_bad_shard_section_names_the_file_and_key(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert message in str(err.value)


def test_shard_section_loads_and_round_trips(tmp_path):
    (tmp_path / "data.yaml").write_text("shard:\n  chunk_frames: 4\n  split: [1, 0, 0]\n  targets: [sex]\n"
                                        "  background: zero\n")
    cfg = load_config(tmp_path / "data.yaml", ["shard.min_frames=12", "shard.mask_scans=null"])
    assert (cfg.shard.chunk_frames, cfg.shard.background, cfg.shard.min_frames) == (4, "zero", 12)
    assert cfg.shard.split == [1.0, 0.0, 0.0] and all(isinstance(v, float) for v in cfg.shard.split)
    assert cfg.shard.targets == ["sex"] and cfg.shard.mask_scans is None
    assert load_config(save_config(cfg, tmp_path / "again.yaml")) == cfg
    assert Config().shard == ShardConfig() and ShardConfig().min_split_subjects == 1


def test_option_choices_have_one_literal_each():
    from brainmt.config import (
        SPLIT_NAMES,
        AnalysisConfig,
        ClusterConfig,
        Device,
        DeviceType,
        LocalCluster,
        TrainConfig,
        config_choices,
        literal_values,
    )

    assert SPLIT_NAMES == ("train", "validation", "test") and config_choices(AnalysisConfig, "split") == list(SPLIT_NAMES)
    assert literal_values(Device) == ("auto", *literal_values(DeviceType)) == ("auto", "cpu", "cuda")
    # TrainConfig.device still spells its Literal out (its owner may switch it to Device): it must stay the same set
    assert config_choices(TrainConfig, "device") == config_choices(AnalysisConfig, "device") == list(literal_values(Device))
    assert config_choices(ClusterConfig, "cluster") == ["auto", "slurm", *literal_values(LocalCluster)]
    assert literal_values(int) == () and config_choices(ShardConfig, "background") == ["min", "zero"]
    with pytest.raises(ConfigError, match="cluster.cluster: must be one of \\['auto', 'slurm', 'local', 'debug'\\]"):
        load_config(None, ["cluster.cluster=pbs"])


def test_importing_the_config_and_the_shard_options_stays_light():
    code = ("import sys, brainmt.config, brainmt.data.shard_args; "
            "print(sorted(m for m in ('torch', 'nibabel', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_selection_key_ranks_by_the_metric_then_the_lower_validation_loss():
    """One rule for the best checkpoint and the best restart: the metric (lower is better for a loss), then the lower
    validation loss; a missing or non-finite loss ranks last."""
    from brainmt.config import selection_key

    assert selection_key("val_auroc", 0.9, 0.7) > selection_key("val_auroc", 0.8, 0.1)
    assert selection_key("val_mse", 0.2, 0.7) > selection_key("val_mse", 0.3, 0.1)
    assert selection_key("val_auroc", 1.0, 0.1) > selection_key("val_auroc", 1.0, 0.3)
    assert selection_key("val_auroc", 1.0, 0.3) > selection_key("val_auroc", 1.0, float("nan"))
    assert selection_key("val_auroc", 1.0, 0.3) > selection_key("val_auroc", 1.0, None)
