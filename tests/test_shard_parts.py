"""The parts of a sharding job array write side by side: none may clear another part's shard in progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_helpers import bids_dataset

ROOT = Path(__file__).parent.parent


def test_parts_sharded_at_the_same_time_all_land(tmp_path):
    raw = bids_dataset(tmp_path / "raw", n=12)
    common = ["--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output", str(tmp_path / "sh"),
              "--min-frames", "10", "--chunk-frames", "4", "--split", "0.5", "0.25", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "brainmt.cli", "shard", *common, *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)

    assert cli("--mask-only").wait() == 0
    parts = [cli("--part", f"{i}/4") for i in range(4)]          # started together, as the tasks of a job array
    outputs = [p.communicate()[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0, 0, 0], outputs
    assert cli("--merge").wait() == 0
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert len(manifest["scans"]) == 12
    assert sorted(p.name for p in (tmp_path / "sh" / "shards").glob("*.tar")) == [
        f"shard-{i:03d}-00000.tar" for i in range(4)]
    assert not list((tmp_path / "sh" / "shards").glob("*.tmp"))
