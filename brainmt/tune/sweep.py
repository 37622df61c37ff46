"""The sweep driver (Tuner, ASHA, restore) and the submitit job that runs it with its own Ray."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import submitit

from brainmt.config import config_from_dict
from brainmt.distributed import detect
from brainmt.fileio import atomic_write_json
from brainmt.train.runlog import JsonlSink
from brainmt.tune.preemption import DriverSupervisor
from brainmt.tune.ray_cluster import (
    RayNode,
    alive_nodes,
    auth_environment,
    done_file,
    failure_file,
    head_file,
    run_worker,
)

log = logging.getLogger("brainmt.tune")
EXPERIMENT = "experiment"      # the Ray Tune experiment directory under <sweep dir>/tune/


def trial_dirname(trial: object) -> str:
    """Short trial directory names (the default repeats every parameter)."""
    return f"trial-{trial.trial_id}"  # type: ignore[attr-defined]


def experiment_dir(sweep_dir: Path) -> Path:
    """Where Ray Tune keeps the sweep's experiment state, trials and checkpoints."""
    return Path(sweep_dir).resolve() / "tune" / EXPERIMENT


def run_driver(cfg_dict: dict, sweep_dir: str | Path, on_fit_returned: Callable[[], None] | None = None) -> dict:
    """Run (or continue) the sweep on the connected Ray cluster; write results.csv, best.yaml and figures.

    ``on_fit_returned`` is called as soon as Tune's fit() returns (its state is saved), before the results.

    Returns {"status": "finished" | "interrupted", "trials", "best": row or None, "results", "best_config"}.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from brainmt.tune import results as res
    from brainmt.tune.space import check_sweep, ray_space, trial_count
    from brainmt.tune.trainable import trial_main

    sweep_dir = Path(sweep_dir).resolve()
    cfg = config_from_dict(cfg_dict, str(sweep_dir / "sweep.yaml"))
    space = check_sweep(cfg, str(sweep_dir / "sweep.yaml"))
    s = cfg.sweep
    resources = {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    _check_resources(resources)
    trainable = tune.with_resources(tune.with_parameters(trial_main, base=cfg_dict, sweep_dir=str(sweep_dir)), resources)
    exp = experiment_dir(sweep_dir)
    if tune.Tuner.can_restore(str(exp)):
        log.info("continuing the sweep in %s (finished trials are kept; unfinished and errored ones resume)", exp)
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=ray_space(space),
            tune_config=tune.TuneConfig(
                metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=s.max_epochs,
                                        grace_period=s.grace_period, reduction_factor=s.reduction_factor),
                search_alg=BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=s.max_concurrent_trials or 0),
                trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=str(exp.parent),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=s.max_failures), verbose=1),
        )
    grid = tuner.fit()
    if on_fit_returned is not None:
        on_fit_returned()
    # the statuses Tune saved (those of the returned grid read "terminated" for trials an interruption left pending);
    # an interruption can also come before the searcher has created every trial, so the count is checked too
    statuses = {t.trial_id: t.status for t in tune.ExperimentAnalysis(str(exp)).trials}
    unfinished, not_started = sweep_progress(statuses, len(grid), trial_count(space, s.num_samples))
    complete = not unfinished and not not_started
    keys = list(space)
    rows = res.collect(grid, sweep_dir, statuses, keys, s.metric, s.mode, s.max_epochs)
    table = res.format_rows(rows, keys, s.metric)
    state = "" if complete else f" (interrupted: {unfinished} unfinished, {not_started} not started)"
    print(f"\nsweep {cfg.name}: {len(rows)} trials{state}, sorted by {s.metric} ({s.mode})\n{table}", flush=True)
    csv_path = res.write_csv(rows, keys, s.metric, sweep_dir / "results.csv")
    best_path = res.write_best(rows, cfg_dict, keys, s.metric, sweep_dir)
    try:
        figures = [str(p) for p in res.plot(rows, space, s.metric, s.max_epochs, sweep_dir / "figures")]
    except Exception:  # a figure is not worth failing a sweep for
        log.exception("could not draw the sweep's figures")
        figures = []
    print(f"results: {csv_path}\nbest config: {best_path}\nfigures: {', '.join(figures)}", flush=True)
    if not complete:
        print(f"the sweep was interrupted; continue it with: python sweeps/tune.py --resume {sweep_dir}", flush=True)
    best = {k: v for k, v in rows[0].items() if k != "history"} if rows and rows[0][s.metric] is not None else None
    return {"status": "finished" if complete else "interrupted", "trials": len(rows), "best": best,
            "results": str(csv_path), "best_config": str(best_path) if best_path else None, "figures": figures}


def sweep_progress(statuses: dict[str, str], returned: int, expected: int) -> tuple[int, int]:
    """(unfinished, not started) trials of a sweep from the statuses Tune saved, the trials its fit returned and the
    number the search space makes; both 0 when the sweep is complete."""
    unfinished = sum(v not in ("TERMINATED", "ERROR") for v in statuses.values()) + max(0, returned - len(statuses))
    return unfinished, max(0, expected - max(len(statuses), returned))


def _check_resources(resources: dict) -> None:
    """A trial that asks for more than a node has would wait forever: fail now, saying what there is."""
    nodes = [n.get("Resources", {}) for n in alive_nodes()]
    for kind, need in resources.items():
        most = max((n.get(kind.upper(), 0.0) for n in nodes), default=0.0)
        if need > most:
            raise RuntimeError(f"sweep.{kind}s_per_trial={need:g} but the largest Ray node has {most:g} {kind.upper()}s; "
                               f"ask the job for more (--{'gpus-per-node' if kind == 'gpu' else 'cpus-per-task'}) "
                               f"or lower sweep.{kind}s_per_trial")


class SweepTask(submitit.helpers.Checkpointable):
    """One task per node: task 0 runs Ray's head and the driver, the others Ray workers. On SIGUSR2 (preemption,
    time limit) Tune stops gracefully and saves its state, then submitit requeues the job, which continues
    with ``Tuner.restore``."""

    def __call__(self, cfg_dict: dict, sweep_dir: str) -> dict:
        """Run this task's part of the sweep; task 0 returns the driver's summary."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        cfg = config_from_dict(cfg_dict, "sweep job config")
        node = _this_node()
        os.environ.pop("RAY_ADDRESS", None)               # never connect to a Ray this job did not start
        done = done_file(Path(sweep_dir), node)
        if node.rank > 0:
            try:
                os.environ.update(auth_environment(Path(sweep_dir), cfg.sweep.ray_auth))
                if run_worker(node, done, head_file(Path(sweep_dir), node)):
                    raise RuntimeError(f"Ray worker on task {node.rank} could not join the head {node.head_host}")
            except BaseException as e:                    # tell the head, which would otherwise wait for this node
                failure_file(Path(sweep_dir), node).write_text(f"{type(e).__name__}: {e}\n")
                raise
            return {"status": "worker", "rank": node.rank}
        try:
            return self._driver(cfg_dict, sweep_dir, node)
        finally:                                          # whatever happened, the workers leave
            done.parent.mkdir(parents=True, exist_ok=True)
            done.touch()

    def _driver(self, cfg_dict: dict, sweep_dir: str, node: RayNode) -> dict:
        """Task 0: the driver (Ray's head or a local Ray, and Tune) in a child process, supervised for requeues
        (Ray's core worker ends its own process when a preemption stops the raylet; this one has no Ray in it)."""
        spec = Path(sweep_dir) / "ray" / f"driver-{node.tag}.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        fit_returned = spec.with_name(f"fit-returned-{node.tag}")
        atomic_write_json(spec, {"config": cfg_dict, "sweep_dir": str(sweep_dir), "node": dataclasses.asdict(node),
                                 "fit_returned": str(fit_returned)})
        _event(sweep_dir, "started", node.job_id, restart=node.attempt, nodes=node.nodes)
        supervisor = DriverSupervisor([sys.executable, "-u", "-m", "brainmt.tune.driver", str(spec)],
                                      Path(sweep_dir) / "summary.json",
                                      lambda event, **extra: _event(sweep_dir, event, node.job_id, **extra),
                                      env=_child_environment(), fit_returned_path=fit_returned)
        return supervisor.run()



# the name sweeps submitted before the rename were pickled with: a requeued one unpickles its callable by it
SweepJob = SweepTask


def _child_environment() -> dict[str, str]:
    """The driver's environment: this one, with this brainmt importable (a source checkout is not on sys.path of a
    new interpreter unless PYTHONPATH says so; an installed package is, and its site directory is not added)."""
    import site

    package_root = Path(__file__).resolve().parents[2]
    sites = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if package_root in sites:
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(package_root), os.environ.get("PYTHONPATH")) if p)}


def _event(sweep_dir: str | Path, event: str, job_id: str, **extra: object) -> None:
    """Append one line to the sweep's events.jsonl (starts, preemptions, ends: what the job log of a requeued job
    no longer shows)."""
    JsonlSink(Path(sweep_dir) / "events.jsonl").log({"time": time.time(), "event": event, "job_id": job_id, **extra})


def _this_node() -> RayNode:
    """This task's rank among the job's tasks (one a node), the head's host and the job id."""
    try:
        env = submitit.JobEnvironment()
        hosts = env.hostnames if env.num_nodes > 1 else [env.hostname]
        return RayNode(env.global_rank, env.num_tasks, hosts[0], str(env.job_id), detect().restart_count)
    except (RuntimeError, KeyError, ValueError):          # not inside a submitit job (the debug executor runs in-process)
        return RayNode(0, 1, "127.0.0.1", str(os.getpid()))

