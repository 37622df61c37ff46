"""The ``brainmt`` command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from brainmt.cli import main


def _brainmt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "brainmt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_info_prints_parameter_breakdown(capsys):
    assert main(["info", "--params-only"]) == 0
    out = capsys.readouterr().out
    assert "6x7x6 = 252 tokens a frame" in out and "total" in out


def test_config_error_exits_2_and_names_the_key(capsys):
    assert main(["info", "--config", "debug", "model.embd_dim=3"]) == 2
    assert "unknown config key 'model.embd_dim'" in capsys.readouterr().err


def test_demo_learns_the_planted_sex_effect(tmp_path):
    """`make demo` into a temporary directory: synth -> shard -> train (submitit local job) -> evaluate.

    The demo's defaults are already small (300 subjects of 20x24x20x40, about a minute); fewer subjects
    leave too few test subjects for a stable AUROC.
    """
    work = tmp_path / "demo"
    proc = _brainmt("demo", "--work-dir", str(work))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(local)" in proc.stdout and "the model learned the planted effect" in proc.stdout
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["target"] == "sex"
    assert metrics["auroc"]["value"] >= 0.8, metrics
    assert (work / "run" / "curves.png").stat().st_size > 10_000
    lines = (work / "run" / "predictions.csv").read_text().splitlines()
    assert len(lines) == 1 + metrics["subjects"] and metrics["subjects"] >= 40
    again = _brainmt("demo", "--work-dir", str(work))     # the second `make demo`: data and finished run reused
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "(0 scans written, 300 already there)" in again.stdout and "resumed from" in again.stdout
    assert json.loads((work / "run" / "metrics.json").read_text())["auroc"] == metrics["auroc"]
