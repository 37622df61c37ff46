"""Ray Tune sweeps with a real local Ray: ASHA, best config, interruption and restore, SLURM, bad sweep files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_helpers import scancel_and_check_gone

from brainmt.config import ConfigError
from brainmt.tune.space import load_sweep, trial_count

ROOT = Path(__file__).parent.parent


def env() -> dict:
    """The environment of a subprocess (read when it starts: the slurm fixture sets SLURM_CONF)."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


def sweep_file(tmp_path: Path, shards: Path, **sweep) -> Path:
    """The debug model over Mamba depth and frame count: 4 trials, 4 epochs of 8 steps, ASHA rungs at 1 and 2."""
    body = {
        "base": "debug", "name": "t",
        # the paper's input: the trials' metrics then fall in an order in which ASHA stops one (with center they rise)
        "model": {"input_norm": "none"},
        "data": {"shards": str(shards), "samples_per_epoch": 32},
        "sweep": {"space": {"model.mamba_depth": {"grid": [1, 2]}, "data.num_frames": {"grid": [8, 16]}},
                  "num_samples": 1, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2,
                  "gpus_per_trial": 0, "cpus_per_trial": 1, "ray_auth": "disabled", **sweep},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def tune_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "tune.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env(), stdin=subprocess.DEVNULL)


def results(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "results.csv").open() as f:
        return list(csv.DictReader(f))


def assert_ray_session_removed(sweep_dir: Path) -> None:
    """A finished sweep's driver deleted its node-local Ray session directory (Ray leaves it in /tmp)."""
    logs = "".join(p.read_text() for p in sweep_dir.glob("slurm/*/*_log.*"))
    removed = re.findall(r"removed the Ray session directory (\S+)", logs)
    assert removed and not any(Path(p).exists() for p in removed), logs[-2000:]


def test_local_sweep_stops_trials_early_and_its_best_config_trains(small_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = tune_cli("--cluster", "local", "--cpus-per-task", "2", "--gpus-per-node", "0", "--time", "30",
                    "--sweep", str(sweep_file(tmp_path, small_shards, max_concurrent_trials=1)),   # trials in grid order:
                    "--run-dir", str(sweep_dir), "--wait")                                         # ASHA's choices fixed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = results(sweep_dir)
    assert len(rows) == 4
    assert {(r["model.mamba_depth"], r["data.num_frames"]) for r in rows} == {("1", "8"), ("1", "16"), ("2", "8"), ("2", "16")}
    assert any(r["status"] == "stopped by ASHA" and int(r["epochs"]) < 4 for r in rows), rows
    assert any(r["status"] == "finished" and r["epochs"] == "4" for r in rows)
    ranked = [float(r["val_pearson_r"]) for r in rows]      # sweep.metric auto: the runs' own selection metric
    assert ranked == sorted(ranked, reverse=True)
    for name in ("metric_vs_params.png", "curves.png"):
        assert (sweep_dir / "figures" / name).stat().st_size > 5000
    assert_ray_session_removed(sweep_dir)
    # every trial is a brainmt run directory on the shared file system, with its validation curve
    for r in rows:
        records = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert len([x for x in records if "val_loss" in x]) == int(r["epochs"])

    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert "sweep" not in best and best["name"] == "t-best"
    assert (best["model"]["mamba_depth"], best["data"]["num_frames"]) == \
        (int(rows[0]["model.mamba_depth"]), int(rows[0]["data.num_frames"]))
    assert best["model"]["num_frames"] == best["data"]["num_frames"]      # the temporal embedding follows
    assert best["train"]["epochs"] == 3                                   # the base config's training length
    run_dir = tmp_path / "best-run"
    trained = subprocess.run([sys.executable, "-m", "brainmt.cli", "train", "--config", str(sweep_dir / "best.yaml"),
                              "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env())
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["subjects"] > 0


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def ended_trials(sweep_dir: Path) -> list[Path]:
    """The run directories of the trials that the experiment state Tune saved (what a restore reads) calls ended."""
    from ray import tune

    from brainmt.tune.trainable import trial_run_dir

    try:
        trials = tune.ExperimentAnalysis(str(sweep_dir / "tune" / "experiment")).trials
    except Exception:                                                   # not saved yet, or being rewritten
        return []
    return [trial_run_dir(sweep_dir, t.trial_id) for t in trials if t.status == "TERMINATED"]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(small_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "sweeps" / "tune.py"), "--cluster", "debug", "--run-dir", str(sweep_dir),
           "--sweep", str(sweep_file(tmp_path, small_shards, max_concurrent_trials=1))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=env(), start_new_session=True)
    deadline = time.time() + 300

    while not ended_trials(sweep_dir):
        assert proc.poll() is None and time.time() < deadline, "no trial finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C at a terminal (the whole group): Tune saves its state, returns
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]                              # interrupted, not finished
    assert "unfinished" in out and f"--resume {sweep_dir}" in out
    # the trials Tune saved as ended
    ended = [Path(r["run_dir"]) for r in results(sweep_dir) if r["status"] in ("finished", "stopped by ASHA")]
    assert ended, results(sweep_dir)
    frozen = _digest([p / "metrics.jsonl" for p in ended] +
                     [sweep_dir / "tune" / "experiment" / p.name / "result.json" for p in ended])

    resumed = tune_cli("--cluster", "debug", "--resume", str(sweep_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _digest([Path(p) for p in frozen]) == frozen                   # finished trials were not run again
    rows = results(sweep_dir)
    assert len(rows) == 4 and all(r["status"] in ("finished", "stopped by ASHA") for r in rows), rows
    assert (sweep_dir / "best.yaml").exists()


def test_a_sweep_interrupted_before_its_searcher_made_every_trial_is_not_complete():
    """CI once sent Ctrl-C after trial 1 of 4 had finished but before Tune created trial 2: the one saved trial was
    TERMINATED, and the sweep called itself finished. The count the space makes is checked too."""
    from brainmt.tune.space import trial_count
    from brainmt.tune.sweep import sweep_progress

    space = {"model.mamba_depth": ("grid", [1, 2]), "data.num_frames": ("grid", [8, 16]),
             "train.lr": ("loguniform", [1e-4, 1e-3])}
    assert trial_count(space, 3) == 12
    assert sweep_progress({"a": "TERMINATED"}, 1, 4) == (0, 3)                        # the case CI hit
    assert sweep_progress({"a": "TERMINATED", "b": "PENDING"}, 2, 4) == (1, 2)
    assert sweep_progress({"a": "TERMINATED", "b": "ERROR", "c": "TERMINATED", "d": "TERMINATED"}, 4, 4) == (0, 0)
    assert sweep_progress({"a": "TERMINATED"}, 2, 2) == (1, 0)                         # returned but never saved


def test_two_node_sweep_starts_a_head_and_a_worker_with_token_auth(small_shards, tmp_path):
    """Two tasks of a local job stand in for two nodes: task 0 runs the Ray head and the driver, task 1 a worker."""
    sweep_dir = tmp_path / "sweep"
    sweep = sweep_file(tmp_path, small_shards, ray_auth="token", max_epochs=1, grace_period=1,
                       space={"model.mamba_depth": {"grid": [1, 2]}})
    proc = tune_cli("--cluster", "local", "--nodes", "2", "--cpus-per-task", "1", "--gpus-per-node", "0",
                    "--sweep", str(sweep), "--run-dir", str(sweep_dir), "--wait")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(results(sweep_dir)) == 2
    token = sweep_dir / "ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    logs = "".join(p.read_text() for p in sweep_dir.glob("slurm/*/*_log.*"))
    assert "Ray cluster: 2 nodes" in logs and "joining the Ray head" in logs
    heads = list((sweep_dir / "ray").glob("head-*"))                   # the head's free port, published
    assert len(heads) == 1 and f"joining the Ray head at {heads[0].read_text().strip()}" in logs
    assert_ray_session_removed(sweep_dir)


def _submit_slurm_sweep(small_shards: Path, tmp_path: Path) -> tuple[Path, str]:
    """A 3-trial sweep submitted to the test SLURM (not waited for): its directory and job id."""
    sweep_dir = tmp_path / "sweep"
    sweep = sweep_file(tmp_path, small_shards, ray_auth="token", max_epochs=2, num_samples=3, max_concurrent_trials=1,
                       space={"optim.lr": {"choice": [1e-3]}})
    proc = tune_cli("--cluster", "slurm", "--partition", "cpu", "--gpus-per-node", "0", "--cpus-per-task", "2",
                    "--time", "20", "--sweep", str(sweep), "--run-dir", str(sweep_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = json.loads((sweep_dir / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]
    assert job_id.isdigit()                                              # a real SLURM job
    return sweep_dir, job_id


@pytest.mark.parametrize("preemption", [False, True], ids=["time-limit", "preemption"])
def test_sweep_job_on_slurm_is_requeued_and_completes(slurm, small_shards, tmp_path, preemption):
    """SIGUSR2 alone (the time limit): Tune stops and saves, then the job requeues. SIGTERM first (a preemption)
    also stops Ray's processes: the job requeues from the state Tune saved last."""
    import submitit

    sweep_dir, job_id = _submit_slurm_sweep(small_shards, tmp_path)
    job = submitit.SlurmJob(folder=sweep_dir / "slurm" / "%j", job_id=job_id)
    deadline = time.time() + 300
    while not (done := ended_trials(sweep_dir)):
        assert time.time() < deadline and not job.done(), "no trial finished"
        time.sleep(0.2)
    frozen = _digest([p / "metrics.jsonl" for p in done])
    job._interrupt(timeout=not preemption)                               # scancel --signal [TERM then] USR2
    summary = job.results()[0]
    assert summary["status"] == "finished" and summary["trials"] == 3
    assert _digest([Path(p) for p in frozen]) == frozen
    events = [json.loads(line) for line in (sweep_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("restart")) for e in events] == \
        [("started", 0), ("preempted", None), ("started", 1), ("finished", None)]
    if not preemption:
        assert events[1]["forced"] is False                              # Tune stopped and saved by itself
    assert "continuing the sweep" in Path(job.paths.stderr).read_text()  # Tuner.restore
    assert len(results(sweep_dir)) == 3 and (sweep_dir / "best.yaml").exists()
    assert json.loads((sweep_dir / "summary.json").read_text())["status"] == "finished"


def test_scancel_ends_a_sweep_job_without_a_requeue(slurm, small_shards, tmp_path):
    """A plain ``scancel`` sends SIGTERM, as a preemption does; SLURM shows the job cancelled, so the sweep job
    records it and ends instead of requeueing itself (it did, and the sweep ran on)."""
    sweep_dir, job_id = _submit_slurm_sweep(small_shards, tmp_path)
    deadline = time.time() + 300
    while not ended_trials(sweep_dir):
        assert time.time() < deadline, "no trial finished"
        time.sleep(0.2)
    scancel_and_check_gone(job_id)
    events = [json.loads(line)["event"] for line in (sweep_dir / "events.jsonl").read_text().splitlines()]
    assert events == ["started", "cancelled"]


def test_requeue_hands_over_to_submitit_once_when_sigusr2_comes_again(tmp_path, monkeypatch):
    """Seen on a real SLURM: a preemption's SIGUSR2 came while submitit's handler ran `scontrol requeue`, the handler
    ran again, and the second requeue of the same job failed the job. Further SIGUSR2s are now ignored."""
    from brainmt.tune.preemption import DriverSupervisor

    calls = []

    def submitit_handler(signum, frame):      # stands in for submitit's: the next SIGUSR2 arrives while it runs
        calls.append(signum)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        supervisor = DriverSupervisor(["true"], tmp_path / "summary.json", on_event=lambda *a, **k: None)
        monkeypatch.setenv("SLURM_JOB_ID", "1")
        supervisor._requeue(forced=True)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2]


def test_a_trial_that_needs_a_gpu_the_cluster_lacks_fails_at_once(small_shards, tmp_path):
    proc = tune_cli("--cluster", "debug", "--sweep", str(sweep_file(tmp_path, small_shards, gpus_per_trial=1)),
                    "--run-dir", str(tmp_path / "sweep"), timeout=300)
    assert proc.returncode == 1
    assert "sweep.gpus_per_trial=1 but the largest Ray node has 0 GPUs" in proc.stderr


def test_a_resumed_trial_drops_the_checkpoints_after_its_report_and_keeps_its_best(tmp_path, monkeypatch):
    """restore_trial_checkpoint: checkpoints written after Tune's last report go (and their metrics), earlier ones,
    the trial's best among them, stay, so `brainmt evaluate --run` of a resumed trial still finds its best."""
    from ray import tune

    from brainmt.train import checkpoint as ckpt
    from brainmt.tune.trainable import restore_trial_checkpoint

    run, reported = tmp_path / "trial", tmp_path / "tune-checkpoint"
    for directory, steps in ((run / "checkpoints", (10, 20, 30)), (reported, (20,))):
        directory.mkdir(parents=True)
        for step in steps:
            ckpt.checkpoint_path(directory, step).write_bytes(b"state")
            ckpt.record_path(ckpt.checkpoint_path(directory, step)).write_text("{}")
    ckpt.checkpoint_path(run / "checkpoints", 20).write_bytes(b"sta")      # a copy an earlier attempt cut short
    ckpt.record_path(ckpt.checkpoint_path(reported, 20)).write_text('{"sha256": null}')
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_auroc": 0.5}) + "\n" for s in (10, 20, 30)))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(reported)))
    assert restore_trial_checkpoint(run) == 20
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [10, 20]
    assert ckpt.checkpoint_path(run / "checkpoints", 20).read_bytes() == b"state"
    assert ckpt.record_path(ckpt.checkpoint_path(run / "checkpoints", 20)).read_text() == '{"sha256": null}'
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert not ckpt.record_path(ckpt.checkpoint_path(run / "checkpoints", 30)).exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [10, 20]


def test_ray_s_session_directory_leaves_its_sockets_within_the_path_limit(monkeypatch):
    """A per-job $TMPDIR of 29 characters made Ray's plasma socket path longer than Linux's 107: /tmp is used then."""
    import tempfile

    from brainmt.tune.ray_cluster import MAX_SOCKET_PATH, RAY_SOCKET_SUFFIX, temp_dir

    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/localscratch/user.12345678.0")
    assert temp_dir("12345678") == "/tmp/brainmt-ray-12345678"
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/lscratch")
    assert temp_dir("12345678") == "/lscratch/brainmt-ray-12345678"
    assert len(temp_dir("12345678")) + RAY_SOCKET_SUFFIX <= MAX_SOCKET_PATH


def test_resume_refuses_another_sample_count(small_shards, tmp_path):
    """Tune restores its own sample count: --resume with another --num-samples would wait for trials never made."""
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    shutil.copy(sweep_file(tmp_path, small_shards), sweep_dir / "sweep.yaml")
    proc = tune_cli("--cluster", "debug", "--resume", str(sweep_dir), "--num-samples", "48")
    assert proc.returncode == 2 and "--num-samples cannot change it" in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_sweep_files_load(path):
    """Every sweep file in sweeps/ passes the checks a sweep job makes before it starts; restarts.yaml's trials
    differ only in their seed and none is stopped early (a run at the prior can still learn)."""
    cfg, space = load_sweep(path, ["data.task=classification", "data.target=sex"])
    assert trial_count(space, cfg.sweep.num_samples) >= 2
    if path.name == "restarts.yaml":
        assert list(space) == ["train.seed"] and trial_count(space, cfg.sweep.num_samples) == 3
        assert cfg.sweep.grace_period == cfg.sweep.max_epochs == cfg.train.epochs
        assert cfg.sweep.metric == "val_auroc" and cfg.sweep.mode == "max"


@pytest.mark.parametrize(("change", "message"), [
    ({"sweep": {"spcae": {}}}, "sweep.spcae"),
    ({"sweep": {"space": {}}}, "sweep.space is empty"),
    ({"sweep": {"space": {"model.mamba_dept": {"choice": [1, 2]}}}}, "model.mamba_dept"),
    ({"sweep": {"space": {"model.mamba_depth": {"normal": [1, 2]}}}}, "sweep.space.model.mamba_depth: expected one of"),
    ({"sweep": {"space": {"model.mamba_depth": {"choice": [1, "two"]}}}}, "model.mamba_depth"),
    ({"sweep": {"space": {"model.mamba_depth": [1, 2]}}}, "sweep.space.model.mamba_depth"),
    ({"sweep": {"space": {"optim.lr": {"loguniform": [0, 1e-3]}}}}, "loguniform needs positive bounds"),
    ({"sweep": {"space": {"data.num_frames": {"choice": [8, 100]}}}}, "max_frames"),
    ({"sweep": {"space": {"cluster.nodes": {"choice": [1, 2]}}}}, "cannot be swept"),
    ({"sweep": {"metric": "val_accuracy_typo"}}, "sweep.metric"),
    ({"sweep": {"metric": "val_loss", "mode": "max"}}, "sweep.mode"),
    ({"sweep": {"metric": "val_auroc", "mode": "max"}}, "data.task=regression"),
    ({"sweep": {"gpus_per_trial": 2}}, "sweep.gpus_per_trial"),
    ({"sweep": {"grace_period": 9}}, "sweep.grace_period"),
])
def test_bad_sweep_files_name_the_key(tmp_path, change, message):
    body = {"base": "debug", "sweep": {"space": {"model.mamba_depth": {"choice": [1, 2]}}, "max_epochs": 4,
                                      "gpus_per_trial": 0}}
    for section, values in change.items():
        body[section] = {**body.get(section, {}), **values}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_cli_refuses_a_bad_sweep_and_a_changed_one(small_shards, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "debug", "sweep": {"space": {"model.mamba_depth": {"grid": []}}}}))
    proc = tune_cli("--sweep", str(bad), "--shards", str(small_shards), "--dry-run")
    assert proc.returncode == 2 and "grid needs a non-empty list" in proc.stderr and str(bad) in proc.stderr
    good = sweep_file(tmp_path, small_shards)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text((ROOT / "sweeps" / "debug.yaml").read_text())   # another sweep lives here
    proc = tune_cli("--sweep", str(good), "--run-dir", str(sweep_dir), "--cluster", "debug")
    assert proc.returncode == 2 and "holds a different sweep" in proc.stderr
    dry = tune_cli("--sweep", str(good), "--cluster", "local", "--dry-run")
    assert dry.returncode == 0 and "#SBATCH" in dry.stdout and "2 swept keys" in dry.stdout


def _token_of(sweep_dir: str, queue) -> None:
    from brainmt.tune.ray_cluster import auth_environment

    path = auth_environment(Path(sweep_dir), "token")["RAY_AUTH_TOKEN_PATH"]
    queue.put(Path(path).read_text())


def test_every_task_of_a_job_gets_the_same_token_when_they_start_at_once(tmp_path):
    """The tasks of a multi-node job create the sweep's token together: one wins, all read the same full token."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_token_of, args=(str(tmp_path), queue)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    tokens = {queue.get(timeout=5) for _ in procs}
    assert len(tokens) == 1 and len(tokens.pop()) == 64
    assert [p.name for p in (tmp_path / "ray").iterdir()] == ["auth_token"]          # no temporary files left
    assert stat.S_IMODE((tmp_path / "ray" / "auth_token").stat().st_mode) == 0o600


def test_head_stops_waiting_when_a_worker_task_failed(tmp_path, monkeypatch):
    """A worker task that fails (here: before Ray starts) writes why; the head fails at once, naming it."""
    import ray

    from brainmt.tune.ray_cluster import RayNode, failure_file, wait_for_nodes

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])           # only the head is up
    node = RayNode(0, 2, "127.0.0.1", "77", attempt=1)
    (tmp_path / "ray").mkdir()
    failure_file(tmp_path, RayNode(1, 2, "127.0.0.1", "77", attempt=0)).write_text("an earlier attempt\n")
    with pytest.raises(RuntimeError, match="only 1 of 2"):                  # another attempt's failure is not this one's
        wait_for_nodes(node, tmp_path, timeout_s=0)
    failure_file(tmp_path, RayNode(1, 2, "127.0.0.1", "77", attempt=1)).write_text("OSError: no space left\n")
    start = time.time()
    with pytest.raises(RuntimeError, match="task 1: OSError: no space left"):
        wait_for_nodes(node, tmp_path, timeout_s=600)
    assert time.time() - start < 5


FAKE_DRIVER = """
import json, pathlib, signal, sys, time
stop_s, run_s, summary, fit_returned = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
asked = []
signal.signal(signal.SIGUSR2, lambda *a: asked.append(time.monotonic()))
start = time.monotonic()
while time.monotonic() - start < run_s and not (asked and time.monotonic() - asked[0] > stop_s):
    time.sleep(0.02)
pathlib.Path(fit_returned).touch()                     # Tune's fit() has returned: results and figures follow
time.sleep(float(sys.argv[5]))
if run_s < 0:
    sys.exit(1)                                        # a driver that fails
status = "interrupted" if asked else "finished"
open(summary, "w").write(json.dumps({"status": status}))
sys.exit(3 if asked else 0)
"""

SUPERVISOR_SCRIPT = """
import os, signal, sys, threading, time
from brainmt.tune.preemption import DriverSupervisor
def submitit_usr2(*a):                                 # stands in for submitit's handler: requeue, then exit
    print("submitit requeues", flush=True)
    sys.exit(-1)
signal.signal(signal.SIGUSR2, submitit_usr2)
sig, grace, stop_s, run_s, post_s, fake, summary = sys.argv[1:]
fit_returned = summary + ".fit"
sup = DriverSupervisor([sys.executable, "-c", fake, stop_s, run_s, summary, fit_returned, post_s], summary,
                       lambda event, **extra: print("event", event, *extra.values(), flush=True), grace_s=float(grace),
                       fit_returned_path=__import__("pathlib").Path(fit_returned))
if sig != "none":
    threading.Timer(0.5, os.kill, (os.getpid(), getattr(signal, sig))).start()
started = time.monotonic()
try:
    print("returned", sup.run()["status"], flush=True)
except RuntimeError as e:
    print("error", e, flush=True)
finally:
    print("seconds", round(time.monotonic() - started), flush=True)
"""


@pytest.mark.parametrize(("sig", "grace", "stop_s", "run_s", "post_s", "expected"), [
    ("SIGUSR2", 5, 0.3, 30, 0, ["event preempted False", "submitit requeues"]),     # the time limit: Tune saved
    ("SIGUSR2", 3, 0.3, 30, 4, ["event preempted False", "submitit requeues"]),     # results after fit(): no grace
    ("SIGUSR2", 0.5, 30, 30, 0, ["event preempted True", "submitit requeues"]),     # Tune never returned
    ("SIGTERM", 30, 30, 30, 0, ["event preempted True", "submitit requeues"]),      # a preemption: at once
    ("SIGINT", 5, 0.3, 30, 0, ["event interrupted", "returned interrupted"]),       # Ctrl-C: saved, no requeue
    ("none", 5, 0, 1, 0, ["event finished", "returned finished"]),
    ("none", 5, 0, -1, 0, ["error the sweep driver exited with code 1; its error is in the job's log above"]),
], ids=["time-limit", "slow-results", "tune-does-not-return", "preemption", "ctrl-c", "finished", "driver-fails"])
def test_the_job_process_requeues_whatever_the_driver_process_does(tmp_path, sig, grace, stop_s, run_s, post_s,
                                                                   expected):
    """The sweep driver runs in a child process (Ray's core worker ends its own process when a preemption stops the
    raylet): the job's process forwards the stop signal, then requeues once, at once on SIGTERM."""
    proc = subprocess.run([sys.executable, "-c", SUPERVISOR_SCRIPT, sig, str(grace), str(stop_s), str(run_s),
                           str(post_s), FAKE_DRIVER, str(tmp_path / "summary.json")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env())
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("seconds")]
    assert lines == expected, proc.stdout + proc.stderr
    seconds = int(proc.stdout.splitlines()[-1].split()[1])
    assert seconds < 10, proc.stdout                                      # never waits for the 30 s driver


def test_a_worker_waits_for_the_head_s_address_and_leaves_when_the_sweep_is_done(tmp_path):
    """A worker task joins at the address the head published; with none it gives up at its deadline, or leaves at
    once when the driver is already done (not the main thread: its SIGUSR2 handler stays as it is)."""
    from concurrent.futures import ThreadPoolExecutor

    from brainmt.tune.ray_cluster import RayNode, done_file, head_file, run_worker

    node = RayNode(rank=1, nodes=2, head_host="localhost", job_id="77", attempt=0)
    head, done = head_file(tmp_path, node), done_file(tmp_path, node)
    assert head == tmp_path / "ray" / "head-77.0"
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        assert pool.submit(run_worker, node, done, head, 3).result() == 1       # no head came
        assert 3 <= time.monotonic() - started < 10
        done.parent.mkdir(parents=True)
        done.touch()
        assert pool.submit(run_worker, node, done, head, 60).result() == 0      # the sweep ended first


def test_waiting_for_the_ray_head_returns_once_it_listens_and_fails_if_it_exits():
    import socket

    from brainmt.tune.ray_cluster import wait_for_port

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            wait_for_port("127.0.0.1", port, alive, timeout_s=10)
        finally:
            alive.kill()
            alive.wait()
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 7"):
        wait_for_port("127.0.0.1", port, dead, timeout_s=10)
