"""Where this process runs: a single process, torchrun, a SLURM task, or a task of submitit's local executor.
The only reader of SLURM_* variables."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process; ``launcher`` is "single", "torchrun", "submitit-local" or "slurm"."""

    launcher: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str | None = None
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list: ``gpu[01-03,07],login1`` -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _first_host(nodelist: str) -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # no scontrol here: expand it ourselves
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_hostlist(nodelist)[0]


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Detect torchrun (RANK/WORLD_SIZE/LOCAL_RANK), then a task of submitit's local executor (SUBMITIT_LOCAL_*: one
    task per GPU on this host), then a SLURM task (SLURM_PROCID/SLURM_NTASKS), else a single process.

    Under SLURM the master is the first host of SLURM_JOB_NODELIST and the port is derived from the job id,
    so every task of a job agrees without talking; local tasks meet on 127.0.0.1 at a port derived from their
    job id the same way. CUDA_VISIBLE_DEVICES is never rewritten.
    """
    env = os.environ if environ is None else environ
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return DistEnv("torchrun", int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")),
                       env.get("SLURM_JOB_ID"), restarts)
    if all(k in env for k in ("SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_JOB_ID")):
        # checked before SLURM: a local job started inside a SLURM allocation inherits the allocation's variables
        job_id = env["SUBMITIT_LOCAL_JOB_ID"]
        return DistEnv("submitit-local", int(env["SUBMITIT_LOCAL_GLOBALID"]),
                       int(env.get("SUBMITIT_LOCAL_LOCALID", env["SUBMITIT_LOCAL_GLOBALID"])),
                       int(env["SUBMITIT_LOCAL_NTASKS"]), "127.0.0.1",
                       20000 + int(re.sub(r"\D", "", job_id) or 0) % 6000, job_id, 0)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        job_id = env["SLURM_JOB_ID"]
        base = env.get("SLURM_ARRAY_JOB_ID", job_id)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        return DistEnv("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]),
                       _first_host(nodelist), 20000 + int(re.sub(r"\D", "", base) or 0) % 6000, job_id, restarts)
    return DistEnv("single")


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int = 1800) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) for a multi-process run; set this rank's GPU."""
    import datetime

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.distributed or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.info("init %s process group: rank %d/%d via %s:%d (%s)", backend, env.rank, env.world_size,
             env.master_addr, env.master_port, env.launcher)
    # torchrun provides its own rendezvous store through the environment; SLURM tasks meet at the derived port
    init_method = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    torch.distributed.init_process_group(
        backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def device_for(env: DistEnv, requested: str = "auto") -> torch.device:
    """The device of this rank: cuda:<local_rank> when CUDA is available (or asked for), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available on this node")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def cleanup() -> None:
    """Destroy the process group if one is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
