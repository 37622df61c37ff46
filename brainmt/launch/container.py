"""Run brainmt inside the Apptainer image: the one command line, and a task's training as a forwarded child.

The submitit runner stays on the host's Python, where ``scontrol requeue`` exists; only the training
runs in ``apptainer exec --nv --bind ... IMAGE python3 -m brainmt.cli train ...``. ``exec_command``
builds that command line for ``jobs/launch.py --container`` and is what ``containers/exec.sh`` writes
too; ``python -m brainmt.launch.container --print-binds PROFILE`` prints a cluster profile's binds
(``containers/exec.sh --profile`` runs it inside the image, so the host needs no brainmt).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from brainmt import signals
from brainmt.config import ClusterConfig, ConfigError, load_config
from brainmt.signals import INTERRUPTED_EXIT

log = logging.getLogger("brainmt.launch")


def exec_command(runtime: str, image: str, binds: Sequence[str], nv: bool, args: Sequence[str]) -> list[str]:
    """``<runtime> exec [--nv] [--bind B ...] IMAGE python3 -m brainmt.cli ARGS...`` (containers/exec.sh writes the same)."""
    cmd = [runtime, "exec"] + (["--nv"] if nv else [])
    for bind in binds:
        cmd += ["--bind", bind]
    return cmd + [image, "python3", "-m", "brainmt.cli", *args]


def container_command(c: ClusterConfig, config_path: Path, shards: str | None, run_dir: Path,
                      evaluate_split: str | None) -> list[str]:
    """The command a task runs: ``<runtime> exec [--nv] [--bind B ...] IMAGE python3 -m brainmt.cli train ...``."""
    args = ["train", "--config", str(config_path), "--run-dir", str(run_dir)]
    if shards:
        args += ["--shards", shards]
    args += ["--split", evaluate_split] if evaluate_split else ["--no-evaluate"]
    return exec_command(c.container_runtime, str(c.container), c.binds, c.gpus_per_node > 0, args)


def run_in_container(cmd: list[str], run_dir: Path) -> dict:
    """Run ``cmd``, forwarding SIGTERM and SIGUSR2 to it; return a result like ``brainmt.train.loop.run``'s."""
    child: subprocess.Popen | None = None
    pending: list[int] = []                       # signals that came before the child existed

    def forward(signum: int, frame: object) -> None:
        if child is None:
            pending.append(signum)
            return
        log.info("forwarding %s to the container (pid %d)", signal.Signals(signum).name, child.pid)
        child.send_signal(signum)

    # handled before the child starts: no signal falls through to the default action
    with signals.handled((signal.SIGTERM, signal.SIGUSR2), forward):
        child = subprocess.Popen(cmd)
        for signum in pending:
            forward(signum, None)
        code = child.wait()
    if code == INTERRUPTED_EXIT:
        return {"status": "interrupted", "returncode": code}
    if code != 0:
        raise RuntimeError(f"the containerised training exited with code {code}: {' '.join(cmd)}")
    metrics = run_dir / "metrics.json"
    result: dict = {"status": "finished", "returncode": 0}
    if metrics.exists():
        result["evaluation"] = json.loads(metrics.read_text())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brainmt.launch.container --print-binds PROFILE``: the profile's ``cluster.binds``, one a line."""
    p = argparse.ArgumentParser(prog="python -m brainmt.launch.container", description=main.__doc__)
    p.add_argument("--print-binds", metavar="PROFILE", required=True, help="cluster profile YAML (or config name)")
    args = p.parse_args(argv)
    try:
        binds = load_config(args.print_binds).cluster.binds
    except (ConfigError, OSError) as exc:
        print(f"brainmt: {exc}", file=sys.stderr)
        return 2
    for bind in binds:
        print(bind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
