"""The model benchmark's smoke test on the CPU: a tiny config, two frame counts, both attention scopes."""

from __future__ import annotations

import json

from brainmt.bench.model import linear_fit, main, scan_flops
from brainmt.config import load_config


def test_model_benchmark_runs_on_the_cpu_and_writes_its_record(tmp_path, capsys):
    out = tmp_path / "bench.json"
    record = main(["--config", "debug", "--device", "cpu", "--frames", "4", "8", "--attention", "spatial", "global",
                   "--steps", "2", "--warmup", "1", "--inference-frames", "4", "--ig-steps", "3", "--ig-batch", "2",
                   "--variant", "lean", "stem_chunk_frames=2", "checkpointing=all", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "step ms" in printed and "integrated gradients lean spatial" in printed
    saved = json.loads(out.read_text())
    assert saved["settings"] == json.loads(json.dumps(record["settings"]))
    assert [(r["attention"], r["frames"], r["status"]) for r in saved["settings"]] == [
        ("spatial", 4, "ok"), ("spatial", 8, "ok"), ("global", 4, "ok"), ("global", 8, "ok")]
    for row in saved["settings"]:
        assert row["step_ms"] > 0 and row["samples_per_s"] > 0 and len(row["step_ms_all"]) == 2
        assert row["flops"]["total"] == row["flops"]["counted"] + row["flops"]["scan_analytic"] > 0
    global_rows = [r for r in saved["settings"] if r["attention"] == "global"]
    assert global_rows[1]["flops"]["counted"] > global_rows[0]["flops"]["counted"]
    assert all(item["status"] == "ok" for item in saved["inference"] + saved["ig"])
    assert all(item["finite"] for item in saved["ig"])


def test_scan_flops_and_memory_fit():
    cfg = load_config("debug").model  # 2x2x2 tokens a frame, d_inner 64, d_state 8, 2 blocks, bidirectional
    assert scan_flops(cfg, frames=4, batch=1) == 3 * 7 * (64 * (1 + 4 * 8) * 8) * 2 * 2
    fit = linear_fit([50, 100, 200], [1.0, 2.0, 4.0])
    assert abs(fit["slope_gib_per_frame"] - 0.02) < 1e-9 and abs(fit["r2"] - 1.0) < 1e-9
    assert linear_fit([50], [1.0]) is None


def test_ddp_benchmark_scales_resumes_across_counts_and_checks_replicas(tmp_path):
    """The multi-GPU benchmark's whole path on CPU processes (gloo): 1 and 2 tasks of a submitit local job."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "brainmt.bench.ddp", "--device", "cpu", "--gpus", "1", "2", "--config", "debug",
           "--frames", "8", "--steps", "3", "--warmup", "1", "--resume-steps", "2", "--subjects", "6",
           "--scan-frames", "16", "--shape", "20", "24", "20", "--chunk-frames", "4", "--workers", "0",
           "--workdir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {r["gpus"]: r for r in record["rows"]}
    assert set(rows) == {1, 2}
    for n, r in rows.items():
        assert r["world_size"] == n and r["launcher"] == "submitit-local" and r["steps_measured"] == 3
        assert r["global_batch"] == 4 * n and r["samples_per_s"] > 0 and r["scaling_target"] == (1.0 if n == 1 else 1.8)
        assert r["replicas_identical"] and r["checkpoint_matches_replicas"] and r["checkpoint_world_size"] == n
        assert len(r["loader_wait_s_per_rank"]) == n and r["loader_wait_s_median"] >= 0
    assert rows[1]["scaling"] == 1.0 and rows[2]["scaling"] > 0
    assert rows[1]["param_digests"][0] != rows[2]["param_digests"][0]      # another global batch: other weights
    assert [(r["saved_on"], r["resumed_on"], r["from_step"], r["to_step"], r["ok"]) for r in record["resumes"]] == \
        [(2, 1, 4, 6, True), (1, 2, 4, 6, True)]
    rank1 = (tmp_path / "work" / "run-2" / "logs" / "rank-1.log").read_text()
    assert "init gloo process group: rank 1/2" in rank1 and "(submitit-local)" in rank1
    assert "replicas" in proc.stdout and "resumed on 1: ok" in proc.stdout
    # every training step logs how long it waited for the loader
    records = [json.loads(line) for line in (tmp_path / "work" / "run-2" / "metrics.jsonl").read_text().splitlines()]
    assert all("loader_wait_s" in r and "step_s" in r for r in records if "train_loss" in r)
