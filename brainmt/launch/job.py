"""What each task of a training job runs (:class:`TrainTask`): the same training main as ``brainmt train``.

Words (docs/architecture.md): a *job* is one submission to the scheduler (SLURM, or submitit's local or debug
executor), with an id, requeued as a whole; a *task* is one of its processes (a DDP rank, for training); a *job
array* is one submission of many *array tasks* (``ID_0``, ``ID_1``, ...). What a job's tasks run is a callable
named ``...Task`` (``TrainTask``, ``AnalyzeTask``, ``BenchTask``); the scripts that submit jobs are the
*launchers* (``jobs/*.py``, ``sweeps/tune.py``).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import submitit

from brainmt.config import config_from_dict
from brainmt.signals import cancelled

log = logging.getLogger("brainmt.launch")


class TrainTask(submitit.helpers.Checkpointable):
    """Train then evaluate one run on every task of a job; on SIGTERM or SIGUSR2 (preemption, time limit) save at
    the step boundary, then requeue the job; after a ``scancel`` save and end.

    ``brainmt.train.loop.train`` catches the signal itself so that the checkpoint is written by the loop
    at a step boundary; once it has returned, the signal is handed to submitit's own handler, which
    pickles this callable (``checkpoint``) and runs ``scontrol requeue``. The requeued job resumes from
    the run directory's newest checkpoint. A preemption sends SIGTERM (the job's SIGUSR2 only where the site
    sets ``PreemptParameters=send_user_signal``), and so does a plain ``scancel``: the job is requeued unless
    SLURM shows it cancelled (:func:`brainmt.signals.cancelled`), as it does at once after a ``scancel``.
    """

    def __call__(self, cfg_dict: dict, shards: str | None, run_dir: str, evaluate_split: str | None = "test") -> dict:
        """Run on every task of the job; returns rank 0's result (every rank returns the same)."""
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        cfg = config_from_dict(cfg_dict, "launch config")
        if cfg.cluster.container:
            from brainmt.config import save_config
            from brainmt.launch.container import container_command, run_in_container

            env = submitit.JobEnvironment()
            config_path = Path(run_dir) / "slurm" / f"job-config-{env.job_id}-{env.global_rank}.yaml"
            save_config(cfg, config_path)
            result = run_in_container(container_command(cfg.cluster, config_path, shards, Path(run_dir),
                                                        evaluate_split), Path(run_dir))
        else:
            from brainmt.train.loop import run

            result = run(cfg, shards, run_dir, evaluate_split=evaluate_split)
        if result["status"] != "interrupted":
            return result
        if os.environ.get("SLURM_PROCID", "0") == "0" and cancelled():     # submitit requeues from rank 0 only
            log.info("the job was cancelled (scancel): checkpoint written, not requeued; the same launch command "
                     "resumes it")
        elif callable(submitit_handler):
            log.info("checkpoint written; handing the preemption to submitit to requeue")
            submitit_handler(signal.SIGUSR2, None)   # rank 0: checkpoint() + scontrol requeue + exit
        return result


# the name jobs submitted before the rename were pickled with: a requeued one unpickles its callable by it
TrainJob = TrainTask
