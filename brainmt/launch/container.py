"""Run a task's training inside a container image as a child process, forwarding the scheduler's signals.

The submitit runner stays on the host's Python, where ``scontrol requeue`` exists; only the training
runs in ``apptainer exec --nv --bind ... IMAGE python3 -m brainmt.cli train ...``.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from pathlib import Path

from brainmt.config import ClusterConfig

log = logging.getLogger("brainmt.launch")
INTERRUPTED_EXIT = 3   # `brainmt train` exits 3 when it stopped at a step boundary after SIGTERM / SIGUSR2


def container_command(c: ClusterConfig, config_path: Path, shards: str | None, run_dir: Path,
                      evaluate_split: str | None) -> list[str]:
    """The command a task runs: ``<runtime> exec [--nv] [--bind B ...] IMAGE python3 -m brainmt.cli train ...``."""
    cmd = [c.container_runtime, "exec"] + (["--nv"] if c.gpus_per_node > 0 else [])
    for bind in c.binds:
        cmd += ["--bind", bind]
    cmd += [str(c.container), "python3", "-m", "brainmt.cli", "train", "--config", str(config_path),
            "--run-dir", str(run_dir)]
    if shards:
        cmd += ["--shards", shards]
    cmd += ["--split", evaluate_split] if evaluate_split else ["--no-evaluate"]
    return cmd


def run_in_container(cmd: list[str], run_dir: Path) -> dict:
    """Run ``cmd``, forwarding SIGTERM and SIGUSR2 to it; return a result like ``brainmt.train.loop.run``'s."""
    child = subprocess.Popen(cmd)
    previous = {}

    def forward(signum: int, frame: object) -> None:
        log.info("forwarding %s to the container (pid %d)", signal.Signals(signum).name, child.pid)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        previous[sig] = signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == INTERRUPTED_EXIT:
        return {"status": "interrupted", "returncode": code}
    if code != 0:
        raise RuntimeError(f"the containerised training exited with code {code}: {' '.join(cmd)}")
    metrics = run_dir / "metrics.json"
    result: dict = {"status": "finished", "returncode": 0}
    if metrics.exists():
        result["evaluation"] = json.loads(metrics.read_text())
    return result
