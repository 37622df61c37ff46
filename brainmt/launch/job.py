"""The submitit job callable: the same training main as ``brainmt train``, requeued on preemption."""

from __future__ import annotations

import logging
import signal

import submitit

from brainmt.config import config_from_dict

log = logging.getLogger("brainmt.launch")


class TrainJob(submitit.helpers.Checkpointable):
    """Train then evaluate one run; on SIGUSR2 (preemption, time limit) save at the step boundary, then requeue.

    ``brainmt.train.loop.train`` catches the signal itself so that the checkpoint is written by the loop
    at a step boundary; once it has returned, the signal is handed to submitit's own handler, which
    pickles this callable (``checkpoint``) and runs ``scontrol requeue``. The requeued job resumes from
    the run directory's newest checkpoint.
    """

    def __call__(self, cfg_dict: dict, shards: str | None, run_dir: str, evaluate_split: str | None = "test") -> dict:
        """Run on every task of the job; returns rank 0's result (every rank returns the same)."""
        from brainmt.train.loop import run

        submitit_handler = signal.getsignal(signal.SIGUSR2)
        cfg = config_from_dict(cfg_dict, "launch config")
        result = run(cfg, shards, run_dir, evaluate_split=evaluate_split)
        if result["status"] == "interrupted" and callable(submitit_handler):
            log.info("checkpoint written at step %d; handing the preemption to submitit to requeue", result["step"])
            submitit_handler(signal.SIGUSR2, None)   # rank 0: checkpoint() + scontrol requeue + exit
        return result
