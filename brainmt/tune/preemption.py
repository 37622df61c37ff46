"""Preemption and time limits in the sweep driver: Tune stops and saves, then submitit requeues the job."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("brainmt.tune")


class PreemptionGuard:
    """SIGUSR2 (SLURM's time-limit signal, or a preemption) reaches every process of the job step.

    Ray's processes are started with SIGUSR2 ignored (the disposition is inherited), so the signal only reaches the
    driver, which asks Tune to stop (SIGUSR1: Tune saves its experiment state and returns from ``fit``); the
    job then hands the signal to submitit, which requeues it, and the next run continues with ``Tuner.restore``.
    A preemption sends SIGTERM, which stops Ray's own processes: Tune then cannot return, and Ray's core worker may
    end the driver process soon after, so a watcher thread (woken through ``signal.set_wakeup_fd`` even while the
    main thread waits inside Ray) requeues the job at once from the state Tune saved last (trial checkpoints of every
    finished epoch included); it does the same when Tune's ``fit`` has not returned ``grace_s`` after SIGUSR2
    (SLURM sends it 120 s before the time limit). The job is requeued once, whoever asks first.
    """

    def __init__(self, on_requeue: Callable[[bool], None], grace_s: float = 60.0) -> None:
        self.on_requeue = on_requeue              # called with forced=True|False just before submitit requeues
        self.grace_s = grace_s
        self.preempted = False
        self.tune_returned = threading.Event()   # Tune's fit() has returned: its state is saved
        self._requeue_lock = threading.Lock()
        self._requeued = False
        self._active = threading.current_thread() is threading.main_thread()
        self._submitit_usr2 = signal.getsignal(signal.SIGUSR2)
        self._submitit_term = signal.getsignal(signal.SIGTERM)
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup_fd = -1

    def before_ray(self) -> None:
        """Ignore SIGUSR2 while Ray's processes are started (they inherit it)."""
        if self._active:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def after_ray(self) -> None:
        """Catch SIGUSR2 in the driver; keep submitit's SIGTERM handler (ray.init replaces it with one that exits)."""
        if not self._active:
            return
        signal.signal(signal.SIGUSR2, self._on_usr2)
        if callable(self._submitit_term):
            signal.signal(signal.SIGTERM, self._submitit_term)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._old_wakeup_fd = signal.set_wakeup_fd(write_fd)
        self._wakeup = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="preemption-watch").start()

    def _on_usr2(self, signum: int, frame: object) -> None:
        self.preempted = True
        log.info("SIGUSR2: stopping the sweep (Tune saves its state), then the job is requeued")
        os.kill(os.getpid(), signal.SIGUSR1)      # Tune's own handler: stop trials, save, return from fit()

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data and not self.tune_returned.is_set():
                # a preemption: SLURM sent SIGTERM to every process of the step, Ray's too. Its driver may end this
                # process at any moment once the raylet is gone, and Tune cannot save again: requeue now
                log.warning("SIGTERM (preemption): Ray's processes are stopping; requeueing from the state Tune "
                            "saved last")
                self._requeue_and_exit()
            if signal.SIGUSR2 in data and not self.tune_returned.wait(self.grace_s):
                log.warning("Tune did not return within %.0f s of SIGUSR2 (Ray's processes were stopped by the "
                            "preemption): requeueing from the state it saved last", self.grace_s)
                self._requeue_and_exit()

    def _requeue_and_exit(self) -> None:
        """Requeue from the watcher thread, then end the process (submitit's own exit would end only this thread)."""
        self.preempted = True
        try:
            self.requeue(forced=True)
        finally:
            os._exit(1)                            # requeued (or failing to): the scheduler ends this run anyway

    def fit_returned(self) -> None:
        """Tune's fit() has returned (its state is saved): the grace after SIGUSR2 ends, SIGTERM no longer requeues."""
        self.tune_returned.set()

    def finished(self) -> None:
        """The driver has returned: stand down, put submitit's handlers back."""
        self.tune_returned.set()
        if not self._active:
            return
        signal.signal(signal.SIGUSR2, self._submitit_usr2)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def requeue(self, forced: bool = False) -> None:
        """Hand the preemption to submitit (checkpoint() + scontrol requeue); only the first call does anything."""
        with self._requeue_lock:
            if self._requeued:
                return
            self._requeued = True
        self.on_requeue(forced)
        if callable(self._submitit_usr2):
            self._submitit_usr2(signal.SIGUSR2, None)
