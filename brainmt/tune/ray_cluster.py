"""A private Ray cluster inside one job: started for the sweep, stopped with it, never another Ray on the machine.

One node: the driver starts a new local Ray (``address="local"``) with the job's CPUs and GPUs. Several nodes: the
job has one task per node (submitit starts them through srun); task 0 starts the Ray head on a free port of its
node, writes that address to the sweep directory and runs the driver against it only; the other tasks read the
address there, start Ray workers that join the head, and leave when the driver writes its done-file. Token
authentication uses a per-sweep secret in the sweep directory (mode 0600, on the shared file system every node
reads); the dashboard is off unless asked for, then bound to 127.0.0.1 of the head node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from brainmt.fileio import atomic_write_text

log = logging.getLogger("brainmt.tune")


@dataclass(frozen=True)
class RayNode:
    """This task's part in the sweep's Ray cluster."""

    rank: int            # 0: the head (and the driver); others: workers
    nodes: int
    head_host: str
    job_id: str
    attempt: int = 0     # SLURM_RESTART_COUNT: a requeued job keeps its id, so its files carry the attempt too

    @property
    def tag(self) -> str:
        """This attempt of the job, for the files its tasks exchange (done-file, worker failures)."""
        return f"{self.job_id}.{self.attempt}"


def auth_environment(sweep_dir: Path, mode: str) -> dict[str, str]:
    """The RAY_AUTH_* variables every Ray process of the sweep needs; creates the sweep's token file (0600)."""
    if mode == "disabled":
        return {"RAY_AUTH_MODE": "disabled"}
    path = Path(sweep_dir) / "ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # every task of a job may get here at once: write a private file, then link it into place (atomic; the
        # first link wins and every task reads the same, complete token)
        tmp = path.with_name(f".auth_token.{socket.gethostname()}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            with contextlib.suppress(FileExistsError):  # another task linked its token first: use that one
                os.link(tmp, path)
        finally:
            tmp.unlink()
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path.resolve())}


# what Ray appends to its session directory for its longest Unix socket: /session_<date>_<time>_<us>_<pid>/sockets/
# plasma_store (about 64 characters with a 7-digit pid); Linux allows 107 for the whole path
RAY_SOCKET_SUFFIX = 66
MAX_SOCKET_PATH = 107


def temp_dir(job_id: str) -> str:
    """Node-local Ray session directory, short enough for Ray's Unix socket paths, private to this job ($TMPDIR, or
    /tmp when $TMPDIR's path would make them too long)."""
    name = f"brainmt-ray-{re.sub(r'[^A-Za-z0-9_-]', '', job_id) or os.getpid()}"
    path = Path(tempfile.gettempdir()) / name
    if len(str(path)) + RAY_SOCKET_SUFFIX > MAX_SOCKET_PATH:
        path = Path("/tmp") / name
    return str(path)


def remove_temp_dir(job_id: str) -> None:
    """Delete this job's Ray session directory on this node once its Ray has stopped."""
    path = Path(temp_dir(job_id))
    if not path.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():                   # a Ray process still writing there
        log.warning("could not remove the Ray session directory %s", path)
    else:
        log.info("removed the Ray session directory %s", path)


def node_resources() -> tuple[int, int]:
    """(CPUs, GPUs) this task may use: its CPU affinity (SLURM binds it) and the GPUs CUDA can see."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus, torch.cuda.device_count() if torch.cuda.is_available() else 0


def _ray_command() -> list[str]:
    ray_bin = Path(sys.executable).with_name("ray")
    return [str(ray_bin)] if ray_bin.exists() else [shutil.which("ray") or "ray"]


def head_file(sweep_dir: Path, node: RayNode) -> Path:
    """Where the head of this attempt of the job writes its address for the worker tasks."""
    return Path(sweep_dir) / "ray" / f"head-{node.tag}"


def free_port(ip: str) -> int:
    """A TCP port free on ``ip`` now (the system picks it): no two jobs on a node derive the same one."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def start_head(node: RayNode, dashboard: bool, sweep_dir: Path) -> tuple[str, subprocess.Popen]:
    """Start the Ray head of a multi-node sweep on this node, on a free port, and once it listens publish its
    address (:func:`head_file`); returns the address and the blocking process."""
    cpus, gpus = node_resources()
    ip = socket.gethostbyname(node.head_host)
    port = free_port(ip)
    cmd = [*_ray_command(), "start", "--head", "--block", f"--node-ip-address={ip}", f"--port={port}",
           f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={temp_dir(node.job_id)}", "--disable-usage-stats",
           f"--include-dashboard={'true' if dashboard else 'false'}"]
    if dashboard:
        cmd.append("--dashboard-host=127.0.0.1")
    log.info("starting the Ray head: %s", " ".join(cmd))
    head = subprocess.Popen(cmd)
    wait_for_port(ip, port, head)
    path = head_file(sweep_dir, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"{ip}:{port}\n")          # whole or absent for a worker reading it
    return f"{ip}:{port}", head


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    """Wait until ``proc`` (Ray's head) accepts connections on ``host:port``; fail if it exits or takes too long."""
    deadline = time.perf_counter() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head exited with code {proc.returncode} before listening on {host}:{port} "
                               "(see the job's log above; another process may hold the port)")
        if time.perf_counter() > deadline:
            proc.terminate()
            raise RuntimeError(f"the Ray head did not listen on {host}:{port} within {timeout_s:.0f} s")
        time.sleep(0.5)


def failure_file(sweep_dir: Path, node: RayNode) -> Path:
    """Where a worker task writes why it stopped, so the head stops waiting for it."""
    return Path(sweep_dir) / "ray" / f"failed-{node.tag}-{node.rank}"


def done_file(sweep_dir: Path, node: RayNode) -> Path:
    """The file the driver writes when the sweep is over: the worker tasks of this attempt then leave."""
    return Path(sweep_dir) / "ray" / f"done-{node.tag}"


def alive_nodes() -> list[dict]:
    """The connected Ray cluster's live nodes (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def release_workers(sweep_dir: Path, node: RayNode, timeout_s: float = 30) -> None:
    """Tell the worker tasks to leave and wait until their Ray nodes are gone while the head is still up (a worker
    whose head has gone first waits 30 s for it before stopping)."""
    path = done_file(sweep_dir, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    deadline = time.perf_counter() + timeout_s
    try:
        while len(alive_nodes()) > 1 and time.perf_counter() < deadline:
            time.sleep(0.5)
    except Exception:  # Ray itself failing here only costs the workers their wait
        log.warning("could not watch the Ray workers leave", exc_info=True)


def wait_for_nodes(node: RayNode, sweep_dir: Path, timeout_s: float = 600) -> None:
    """Wait until ``expected`` Ray nodes (head + workers) are alive in the connected cluster; fail at once when a
    worker task reports that it failed."""
    import ray

    expected = node.nodes
    deadline = time.perf_counter() + timeout_s
    while True:
        alive = len(alive_nodes())
        if alive >= expected:
            log.info("Ray cluster: %d nodes, resources %s", alive, ray.cluster_resources())
            return
        failed = sorted(Path(sweep_dir, "ray").glob(f"failed-{node.tag}-*"))
        if failed:
            reasons = "; ".join(f"task {p.name.rsplit('-', 1)[1]}: {p.read_text().strip()}" for p in failed)
            raise RuntimeError(f"a Ray worker task failed before joining the head ({reasons})")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {alive} of {expected} Ray nodes joined within {timeout_s:.0f} s; see the job's "
                               "task logs for the workers' errors")
        time.sleep(2)


def head_address(head: Path, done_file: Path, deadline: float) -> str | None:
    """The head's address once it is written to ``head``; None when the driver is done first or at ``deadline``."""
    while not head.exists():
        if done_file.exists() or time.perf_counter() > deadline:
            return None
        time.sleep(2)
    return head.read_text().strip()


def run_worker(node: RayNode, done_file: Path, head: Path, timeout_s: float = 600) -> int:
    """Join the head whose address is written to ``head`` as a Ray worker and stay until the driver writes
    ``done_file``; returns an exit status."""
    deadline = time.perf_counter() + timeout_s
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # SLURM's time-limit signal is the driver's to handle
    address = head_address(head, done_file, deadline)
    if address is None:
        if done_file.exists():
            return 0
        log.error("the Ray head did not write its address to %s within %.0f s", head, timeout_s)
        return 1
    cpus, gpus = node_resources()
    cmd = [*_ray_command(), "start", "--block", f"--address={address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
           "--disable-usage-stats"]
    while not done_file.exists():
        log.info("joining the Ray head at %s", address)
        proc = subprocess.Popen(cmd)
        while proc.poll() is None and not done_file.exists():
            time.sleep(2)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
            return 0
        if time.perf_counter() > deadline:
            log.error("could not join the Ray head at %s (ray start exited %s)", address, proc.returncode)
            return 1
        time.sleep(5)   # the head was not up yet, or went away: try again while the sweep runs
    return 0
