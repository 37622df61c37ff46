"""jobs/launch.py against a real single-node SLURM (started by the ``slurm`` fixture), and its dry run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_helpers import scancel_and_check_gone

from brainmt.data.shards import ShardOptions, shard_dataset
from brainmt.data.synthetic import write_synthetic_bids
from brainmt.train import checkpoint as ckpt

ROOT = Path(__file__).parent.parent
TRAIN = ["data.num_frames=8", "model.num_frames=8", "train.log_every=1", "data.num_workers=0"]


@pytest.fixture
def shards(small_shards: Path) -> Path:
    return small_shards


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def _cpu_job(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--cluster", "slurm", "--partition", "gpu", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
            "--cpus-per-task", "1", "--time", "10", "--config", "debug", "--shards", str(shards), "--run-dir", str(run_dir),
            *TRAIN, *extra]


def test_two_task_ddp_job_trains_and_evaluates(slurm, shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(*_cpu_job(shards, run_dir, "train.epochs=2", "data.samples_per_epoch=32"), "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout and "training finished at step 8" in proc.stdout  # 2 x 32 / (4 x 2)
    assert "rank0 INFO brainmt.train: training debug" in proc.stdout                   # --wait streamed rank 0's log
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert f"init gloo process group: rank {rank}/2" in log and "(slurm)" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["subjects"] > 0 and "pearson_r" in metrics          # replicas were compared before evaluating
    deadline = time.time() + 60                   # the result files come a moment before SLURM calls the job ended
    while "state COMPLETED" not in (status := launch("--status", str(run_dir))).stdout and time.time() < deadline:
        time.sleep(1)
    assert status.returncode == 0 and "state COMPLETED, requeues 0" in status.stdout and "test: mse" in status.stdout


def test_preempted_job_is_requeued_and_finishes_like_an_uninterrupted_one(slurm, shards, tmp_path):
    args = ("train.epochs=2", "data.samples_per_epoch=480", "train.checkpoint_every_steps=5")
    reference = launch(*_cpu_job(shards, tmp_path / "reference", *args), "--wait")
    assert reference.returncode == 0, reference.stdout + reference.stderr

    import submitit

    run_dir = tmp_path / "preempted"
    proc = launch(*_cpu_job(shards, run_dir, *args))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = json.loads((run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]
    job = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=(0, 1))
    deadline = time.time() + 300
    while not ckpt.list_checkpoints(run_dir / "checkpoints"):             # the job has visibly started
        assert time.time() < deadline and not job.done(), "no checkpoint appeared"
        time.sleep(0.2)
    job._interrupt()                                                       # scancel --signal USR2, as a preemption
    result = job.results()[0]
    assert result["status"] == "finished"
    logs = (run_dir / "logs" / "rank-0.log").read_text()
    assert "stop requested" in logs and "resumed from" in logs
    assert json.loads((run_dir / "metrics.json").read_text())["pearson_r"] == \
        json.loads((tmp_path / "reference" / "metrics.json").read_text())["pearson_r"]
    a = ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir / "checkpoints")[-1][1])["model"]
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "reference" / "checkpoints")[-1][1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cancelled_asks_scontrol_and_reads_a_failure_as_not_cancelled(tmp_path, monkeypatch):
    """``cancelled``: True only for what ``scontrol`` shows after a ``scancel`` (COMPLETING or CANCELLED, Reason=None,
    no PreemptTime; the lines below as SLURM 22.05 printed them); a preemption, a time limit, a running job, no job
    id, no ``scontrol`` or a failing one are not a cancel (a stop is then treated as a preemption and requeued)."""
    from brainmt.signals import cancelled

    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    monkeypatch.setenv("PATH", str(fake.parent))
    assert not cancelled("7")                                               # no scontrol at all
    cases = [("JobState=COMPLETING Reason=None PreemptEligibleTime=2026-11-30T23:28:49 PreemptTime=None", 0, True),
             ("JobState=COMPLETING Reason=None", 0, True),                   # a cluster without preemption
             ("JobState=CANCELLED Reason=None PreemptTime=None", 0, True),
             ("JobState=COMPLETING Reason=None PreemptTime=2026-11-30T23:26:51", 0, False),   # preempted
             ("JobState=COMPLETING Reason=TimeLimit PreemptTime=None", 0, False),             # time limit
             ("JobState=RUNNING Reason=None PreemptTime=None", 0, False),
             ("JobState=COMPLETING Reason=None PreemptTime=None", 1, False),
             # the first value of a key counts: a later field's value may hold spaces and look like one
             ("JobState=COMPLETING Reason=TimeLimit PreemptTime=None WorkDir=/x Reason=None", 0, False),
             ("JobState=COMPLETING Reason=None PreemptTime=None Command=/a b Reason=TimeLimit", 0, True),
             # several records: the first line is the job's own
             ("JobState=COMPLETING Reason=TimeLimit PreemptTime=None\nJobId=8 JobState=COMPLETING Reason=None", 0,
              False)]
    for fields, code, expected in cases:
        fake.write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path / 'args'}\n"
                        f"printf 'JobId=7 JobName=train UserId=root(0) {fields} Dependency=(null)\\n'\nexit {code}\n")
        fake.chmod(0o755)
        assert cancelled("7") is expected, fields
    assert (tmp_path / "args").read_text().split() == ["--oneliner", "show", "job", "7"]
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not cancelled() and not cancelled("")


def test_scancel_ends_the_job_with_a_checkpoint_and_no_requeue(slurm, shards, tmp_path):
    """A plain ``scancel`` (SIGTERM, as a preemption sends) is a cancel, which SLURM records at once: the loop saves
    at the step boundary, the job ends CANCELLED and is not requeued (it was, and trained on to the end); the same
    command resumes it."""
    run_dir = tmp_path / "cancelled"
    job_args = _cpu_job(shards, run_dir, "train.epochs=2", "data.samples_per_epoch=480", "train.checkpoint_every_steps=5")
    assert launch(*job_args).returncode == 0
    job_id = json.loads((run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]
    deadline = time.time() + 300
    while not ckpt.list_checkpoints(run_dir / "checkpoints"):             # the job has visibly started
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    scancel_and_check_gone(str(job_id))
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "stop requested (SIGTERM)" in log and "cancelled (scancel)" in log and "resumed from" not in log
    assert not (run_dir / "metrics.json").exists()
    status = launch("--status", str(run_dir)).stdout
    assert "state CANCELLED" in status and "requeues 0" in status, status
    resumed = launch(*job_args, "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in (run_dir / "logs" / "rank-0.log").read_text() and (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("style, line", [("gpus_per_node", "#SBATCH --gpus-per-node=4"), ("gres", "#SBATCH --gres=gpu:4")])
def test_dry_run_prints_the_sbatch_script_from_the_profile(shards, tmp_path, style, line):
    profile = tmp_path / "site.yaml"
    profile.write_text(f"cluster:\n  partition: a100\n  account: neuro-lab\n  gpu_request: {style}\n  gpus_per_node: 4\n"
                       "  time_min: 720\n  setup: ['module load cuda/12.4']\n")
    proc = launch("--profile", str(profile), "--nodes", "2", "--shards", str(shards), "--run-dir", str(tmp_path / "r"),
                  "--dry-run", "data.num_frames=16", "model.num_frames=16")      # paper.yaml's 20 > these scans
    assert proc.returncode == 0, proc.stderr
    for expected in (line, "#SBATCH --partition=a100", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                     "#SBATCH --time=720", "#SBATCH --account=neuro-lab", "module load cuda/12.4", "# resolved config"):
        assert expected in proc.stdout, expected
    assert not (tmp_path / "r").exists()                                   # nothing submitted, nothing written


def test_bad_requests_are_refused_with_a_clear_message(slurm, shards, tmp_path):
    base = ["--cluster", "slurm", "--gpus-per-node", "0", "--time", "5", "--config", "debug", "--shards", str(shards)]
    proc = launch(*base, "--partition", "nosuch", "--run-dir", str(tmp_path / "a"))
    assert proc.returncode == 2 and "refused the job" in proc.stderr and "partition" in proc.stderr.lower()
    proc = launch(*base, "--partition", "gpu", "--cpus-per-task", "64", "--run-dir", str(tmp_path / "b"))
    assert proc.returncode == 2 and "refused the job" in proc.stderr
    proc = launch("--config", str(tmp_path / "missing.yaml"), "--shards", str(shards), "--dry-run")
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    proc = launch(*base, "--partition", "gpu", "--shards", str(tmp_path / "noshards"), "--run-dir", str(tmp_path / "c"))
    assert proc.returncode == 2 and "shard directory not found" in proc.stderr
    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / "config.yaml").write_text("model:\n  embed_dim: 64\n")
    proc = launch(*base, "--partition", "gpu", "--run-dir", str(owned))
    assert proc.returncode == 2 and "another configuration" in proc.stderr
    assert (owned / "config.yaml").read_text() == "model:\n  embed_dim: 64\n"   # nothing lost


def test_dry_run_refuses_a_resume_on_another_global_batch(shards, tmp_path):
    """A run of one task with batch 4, launched again on 2 tasks: refused before submitting, naming the batch that
    keeps the global batch; with it the dry run passes."""
    from brainmt.config import load_config
    from brainmt.train.loop import train

    extra = [*TRAIN, "train.epochs=1", "data.samples_per_epoch=16"]
    run_dir = tmp_path / "run"
    assert train(load_config("debug", extra), shards, run_dir, stop_at_step=1)["status"] == "interrupted"
    two = ["--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--config", "debug", "--shards",
           str(shards), "--run-dir", str(run_dir), "--dry-run", *extra]
    proc = launch(*two)
    assert proc.returncode == 2 and "global batch of 4" in proc.stderr, proc.stderr
    assert "train.batch_size=2 optim.accumulate_steps=1" in proc.stderr
    proc = launch(*two, "train.batch_size=2")
    assert proc.returncode == 0, proc.stderr
    proc = launch(*[a if a != "local" else "debug" for a in two])            # debug: one task, in this process
    assert proc.returncode == 0, proc.stderr


def test_force_moves_a_foreign_run_directory_aside(shards, tmp_path):
    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / "config.yaml").write_text("model:\n  embed_dim: 64\n")
    proc = launch("--cluster", "debug", "--config", "debug", "--shards", str(shards), "--run-dir", str(owned), "--force",
                  "--wait", *TRAIN, "train.epochs=1", "data.samples_per_epoch=8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("owned.replaced-")]
    assert len(aside) == 1 and (aside[0] / "config.yaml").read_text() == "model:\n  embed_dim: 64\n"
    assert (owned / "metrics.json").exists()


def _content(manifest: dict) -> dict:
    """A manifest without what depends on where and when scans were written (timestamps, shard names, offsets)."""
    scans = {s: {k: v for k, v in m.items() if k not in ("shard", "chunks")} | {"frames_in_chunks": [c[2:] for c in m["chunks"]]}
             for s, m in manifest["scans"].items()}
    return {**{k: v for k, v in manifest.items() if k not in ("created", "shards", "scans")}, "scans": scans}


def shard_array_job(raw: Path, out: Path) -> subprocess.CompletedProcess:
    """jobs/shard.py on the test SLURM: a mask job, an array of 2 slices and a merge, waited for."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "shard.py"), "--cluster", "slurm", "--partition", "cpu",
                           "--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output", str(out),
                           "--array-size", "2", "--min-frames", "10", "--cpus-per-task", "1", "--time", "10", "--wait"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_shard_array_and_merge_equal_one_process(slurm, tmp_path):
    from brainmt.data.loader import ShardSet

    raw = write_synthetic_bids(tmp_path / "raw", 20, 20, (16, 18, 16), seed=4)   # every split non-empty
    shard_dataset(raw, raw / "participants.tsv", tmp_path / "single", options=ShardOptions(min_frames=10), progress=False)
    proc = shard_array_job(raw, tmp_path / "array")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mask job" in proc.stdout and "array of 2 slices" in proc.stdout
    single = json.loads((tmp_path / "single" / "manifest.json").read_text())
    array = json.loads((tmp_path / "array" / "manifest.json").read_text())
    assert len({s["shard"].split("-")[1] for s in array["shards"]}) == 2            # both slices wrote shards
    assert _content(array) == _content(single)
    a, b = ShardSet(tmp_path / "array", verify="sha256"), ShardSet(tmp_path / "single")
    for scan in a.scans:
        assert (a.read_frames(scan, 0, 20) == b.read_frames(scan, 0, 20)).all()
    assert json.loads((tmp_path / "array" / "splits.json").read_text()) == \
        json.loads((tmp_path / "single" / "splits.json").read_text())


def test_shard_array_stops_waiting_when_the_mask_job_fails(slurm, tmp_path):
    """A failed first job leaves the array and merge waiting on a dependency SLURM can never meet: --wait cancels
    them and exits 1 naming the job (it waited forever before)."""
    raw = write_synthetic_bids(tmp_path / "raw", 6, 20, (16, 18, 16), seed=4)   # too few subjects for three splits
    proc = shard_array_job(raw, tmp_path / "array")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed; the jobs after it were cancelled" in proc.stderr and "split 'test' would have 0" in proc.stderr


def test_container_runs_training_as_a_child_of_the_host_runner(shards, tmp_path):
    """--container without Apptainer: a stand-in runtime records the call and runs the command on the host."""
    import os

    profile = tmp_path / "site.yaml"
    profile.write_text(f"cluster:\n  container_runtime: {ROOT / 'tests' / 'fake_apptainer.sh'}\n  binds: ['/data:/data']\n")
    env = {**os.environ, "FAKE_APPTAINER_LOG": str(tmp_path / "calls.log"), "FAKE_APPTAINER_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "launch.py"), "--cluster", "local", "--gpus-per-node", "0",
                           "--container", "brainmt.sif", "--profile", str(profile), "--config", "debug", "--shards",
                           str(shards), "--run-dir", str(tmp_path / "run"), "--wait", *TRAIN, "train.epochs=1",
                           "data.samples_per_epoch=8"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    call = (tmp_path / "calls.log").read_text()
    assert call.startswith("exec --bind /data:/data brainmt.sif python3 -m brainmt.cli train --config ")
    assert "--nv" not in call and f"--run-dir {tmp_path / 'run'}" in call
    assert "training finished" in proc.stdout and (tmp_path / "run" / "metrics.json").exists()


def test_container_child_receives_the_forwarded_preemption_signal(tmp_path):
    import os
    import signal
    import threading

    from brainmt.launch.container import run_in_container

    ready = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib\n"
             "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(3))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(60)\nsys.exit(0)\n")

    def preempt():
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=preempt, daemon=True).start()
    start = time.time()
    result = run_in_container([sys.executable, "-c", child], tmp_path)
    assert result == {"status": "interrupted", "returncode": 3} and time.time() - start < 30
    with pytest.raises(RuntimeError, match="exited with code 7"):
        run_in_container([sys.executable, "-c", "import sys; sys.exit(7)"], tmp_path)
