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


def test_demo_end_to_end_through_submitit_local(tmp_path):
    run_dir = tmp_path / "demo"
    proc = _brainmt("demo", "--run-dir", str(run_dir), "--steps", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "local executor" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_mse"] < 0.7 * metrics["val_mse_of_mean_predictor"], metrics
    assert metrics["val_pearson_r"] > 0.5
    assert (run_dir / "config.yaml").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 120
