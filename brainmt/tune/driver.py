"""The sweep driver process: ``python -m brainmt.tune.driver SPEC.json``, started by task 0 of a sweep job.

It starts Ray (a local Ray, or the head of a multi-node job and waits for the workers), runs Tune, writes the
sweep's results and ``summary.json``, and exits 0 when every trial has finished, 3 when Tune stopped first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from brainmt.fileio import atomic_write_json
from brainmt.signals import INTERRUPTED_EXIT
from brainmt.tune.preemption import TuneStopper
from brainmt.tune.ray_cluster import (
    RayNode,
    auth_environment,
    node_resources,
    release_workers,
    remove_temp_dir,
    start_head,
    temp_dir,
    wait_for_nodes,
)


def drive(cfg_dict: dict, sweep_dir: str, node: RayNode, fit_returned: Path | None = None) -> dict:
    """Start this job's Ray, run (or continue) the sweep, write summary.json; returns the summary. ``fit_returned``
    is touched when Tune's fit() returns (the job's process stops counting the time-limit grace then)."""
    from brainmt.config import config_from_dict
    from brainmt.tune.sweep import run_driver

    cfg = config_from_dict(cfg_dict, "sweep job config")
    os.environ.update(auth_environment(Path(sweep_dir), cfg.sweep.ray_auth))
    import ray  # after RAY_AUTH_* are set: Ray reads them when it is imported

    stopper = TuneStopper()
    stopper.before_ray()
    head = None
    try:
        if node.nodes > 1:
            address, head = start_head(node, cfg.sweep.dashboard, Path(sweep_dir))
            ray.init(address=address, log_to_driver=True)
            wait_for_nodes(node, Path(sweep_dir))
        else:
            cpus, gpus = node_resources()
            ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=cfg.sweep.dashboard,
                     dashboard_host="127.0.0.1", _temp_dir=temp_dir(node.job_id), configure_logging=False)
        stopper.after_ray()
        summary = run_driver(cfg_dict, sweep_dir, on_fit_returned=fit_returned.touch if fit_returned else None)
    finally:
        if node.nodes > 1 and ray.is_initialized():
            release_workers(Path(sweep_dir), node)
        ray.shutdown()
        if head is not None:
            head.terminate()
            head.wait(timeout=120)
    atomic_write_json(Path(sweep_dir) / "summary.json", summary)
    if summary["status"] == "finished":
        remove_temp_dir(node.job_id)     # node-local; Ray leaves it behind (an interrupted sweep keeps its logs)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the driver described by a spec file ({config, sweep_dir, node}); exit status 0 finished, 3 interrupted."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)    # until Ray is up; the job's process sends it again
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m brainmt.tune.driver SPEC.json (started by the sweep job)", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    fit_returned = Path(spec["fit_returned"]) if spec.get("fit_returned") else None
    summary = drive(spec["config"], spec["sweep_dir"], RayNode(**spec["node"]), fit_returned)
    return 0 if summary["status"] == "finished" else INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
