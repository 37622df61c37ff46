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
