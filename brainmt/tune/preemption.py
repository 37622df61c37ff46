"""Preemption and time limits of a sweep job.

The sweep driver (Ray and Tune) runs in a child process of the job's task 0; the job's own process holds no Ray
connection and turns signals into requeues. Ray's core worker ends its process as soon as Ray's raylet goes away,
which a preemption's SIGTERM does to every process of the job step: a requeue from inside the driver's process raced
with that exit (and lost, in CI). The job's process survives it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from brainmt import signals
from brainmt.signals import INTERRUPTED_EXIT

log = logging.getLogger("brainmt.tune")



class DriverSupervisor:
    """Runs the driver command and decides, when it ends or a signal comes, whether the job is requeued.

    - SIGUSR2 (SLURM's time-limit signal, or a preemption): forwarded to the driver (again every few seconds until
      Tune's fit() returns: a driver still starting Ray cannot take it yet), which asks Tune to stop and save its
      state; once the driver has returned, the job is requeued. If Tune's ``fit`` has not returned within ``grace_s`` (the driver
      touches ``fit_returned_path`` when it has; SLURM sends the signal 120 s before the limit), the job is
      requeued anyway from the state Tune saved last.
    - SIGTERM (a preemption): Ray's processes are stopping and Tune cannot save again: the job is requeued at once,
      unless SLURM shows it cancelled (``scancel`` sends SIGTERM too; :func:`brainmt.signals.cancelled`), even
      after a SIGUSR2.
    - SIGINT (Ctrl-C; the debug executor runs the job in the foreground): forwarded to the driver as SIGUSR2, which
      saves and returns "interrupted"; no requeue. The driver ignores SIGINT itself (Tune's own handler is off:
      a Ctrl-C at the terminal reaches every process of the group, and a second SIGINT makes Tune skip its save);
      it stays in the job's process group, so that a scheduler that tracks jobs by group still sees it.
    """

    def __init__(self, cmd: list[str], summary_path: Path, on_event: Callable[..., None], grace_s: float = 60.0,
                 poll_s: float = 0.2, env: dict[str, str] | None = None, fit_returned_path: Path | None = None,
                 resend_s: float = 5.0) -> None:
        self.cmd = cmd
        self.env = env
        self.summary_path = Path(summary_path)
        self.fit_returned_path = fit_returned_path
        self.resend_s = resend_s
        self._sent_at = 0.0
        self._started_at = 0.0
        self.on_event = on_event                 # on_event(name, **fields): the sweep's events.jsonl
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.child: subprocess.Popen | None = None
        self.usr2_at: float | None = None
        self.terminated = False
        self.cancelled = False                   # SIGTERM came from a scancel (asked while the handlers hold)
        self.interrupted = False
        self._submitit_usr2 = signal.getsignal(signal.SIGUSR2)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGTERM:
            self.terminated = True
            return
        if signum == signal.SIGUSR2 and self.usr2_at is None:
            self.usr2_at = time.monotonic()
        if signum == signal.SIGINT:
            if self.interrupted and self.child is not None and self.child.poll() is None:
                log.warning("SIGINT again: ending the sweep driver without waiting for Tune")
                self.child.terminate()
                return
            self.interrupted = True
        log.info("%s: asking the sweep driver to stop (Tune saves its state)", signal.Signals(signum).name)
        self._forward()

    def _forward(self) -> None:
        """Send the driver SIGUSR2, unless it is not started or its interpreter is starting (SIGUSR2 would kill it):
        the wait loop sends it then."""
        child = self.child
        if child is None or time.monotonic() - self._started_at < 2.0 or child.poll() is not None:
            return
        self._sent_at = time.monotonic()
        child.send_signal(signal.SIGUSR2)

    def _stop_requested(self) -> bool:
        return self.usr2_at is not None or self.interrupted

    def _fit_returned(self) -> bool:
        """Tune's fit() has returned (its state is saved): no SIGUSR2 is sent again while the driver winds down."""
        return self.fit_returned_path is not None and self.fit_returned_path.exists()

    def _late(self) -> bool:
        """SIGUSR2 came more than grace_s ago and Tune's fit() has not returned."""
        if self.usr2_at is None or time.monotonic() - self.usr2_at <= self.grace_s:
            return False
        return not self._fit_returned()

    def _wait(self) -> int | None:
        """Start the driver and wait for it; None when it was given up (SIGTERM, or no return within the grace)."""
        # handled before the child starts; a stop asked for before it could take one is sent by the loop below
        with signals.handled((signal.SIGUSR2, signal.SIGTERM, signal.SIGINT), self._on_signal):
            if self.fit_returned_path is not None:
                self.fit_returned_path.unlink(missing_ok=True)
            env = {**(os.environ if self.env is None else self.env), "TUNE_DISABLE_SIGINT_HANDLER": "1",
                   "PYTHONUNBUFFERED": "1"}
            self.child = subprocess.Popen(self.cmd, env=env)
            self._started_at = time.monotonic()
            while self.child.poll() is None and not self.terminated and not self._late():
                if self._stop_requested() and time.monotonic() - self._sent_at > self.resend_s and not self._fit_returned():
                    self._forward()                        # the first one, or again: the driver may have been starting Ray
                time.sleep(self.poll_s)
            if self.terminated:
                self.cancelled = signals.cancelled()        # asked while these handlers hold: a SIGUSR2 meanwhile counts
            if self.child.poll() is None:
                log.warning("%s: the sweep stops with the state Tune saved last",
                            "SIGTERM (a preemption or a scancel): Ray's processes are stopping" if self.terminated
                            else f"Tune did not return within {self.grace_s:.0f} s of SIGUSR2")
                return None
            if self.child.returncode not in (0, INTERRUPTED_EXIT):
                time.sleep(1.0)                            # the driver died of a signal this process gets too?
            return self.child.returncode

    def run(self) -> dict:
        """Run the driver; return its summary, or requeue the job (submitit ends the process then)."""
        code = self._wait()
        summary = None
        if code in (0, INTERRUPTED_EXIT) and self.summary_path.exists():
            summary = json.loads(self.summary_path.read_text())
            if summary["status"] == "finished":
                self.on_event("finished")
                return summary
        if self.cancelled:
            try:
                self.on_event("cancelled")
            except OSError:
                log.exception("could not record the cancel")
            self._stop_child()
            raise RuntimeError("the sweep job was cancelled (scancel): not requeued; continue the sweep with --resume")
        if code is None or self.terminated or self.usr2_at is not None:
            self._requeue(forced=summary is None)
        self._stop_child()
        if summary is None and self.interrupted:
            raise KeyboardInterrupt(f"the sweep driver ended (code {code}) before Tune had saved; continue the sweep "
                                    "with --resume")
        if summary is None:
            if code is None:
                raise RuntimeError("the sweep driver was stopped by a preemption before Tune returned; continue the "
                                   "sweep with --resume")
            raise RuntimeError(f"the sweep driver exited with code {code}; its error is in the job's log above")
        self.on_event(summary["status"])
        return summary

    def _requeue(self, forced: bool) -> None:
        """Record the preemption, stop the driver if it still runs, and hand over to submitit (checkpoint + scontrol
        requeue + exit). Without submitit's handler (the debug executor) the sweep ends as interrupted."""
        try:
            self.on_event("preempted", forced=forced)
        except OSError:
            log.exception("could not record the preemption")
        if "SLURM_JOB_ID" not in os.environ:
            self._stop_child()                           # a local job restarts at once: its driver must be gone
        elif self.child is not None and self.child.poll() is None:
            self.child.terminate()                       # no wait: requeueing comes first (SLURM ends the step)
        if callable(self._submitit_usr2):
            log.info("handing the preemption to submitit to requeue the job")
            # one requeue: a SIGUSR2 arriving during `scontrol requeue` (a preemption sends TERM, then USR2) would run
            # submitit's handler again, whose second requeue of the same job fails and ends the job with an error
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            self._submitit_usr2(signal.SIGUSR2, None)

    def _stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()


class TuneStopper:
    """In the driver process: SIGUSR2 asks Tune to stop and save (SIGUSR1, Tune's own handler), once.

    Ray's processes are started with SIGUSR2 ignored (the disposition is inherited), so that the signal stops the
    sweep through the driver instead of killing the raylet. If the job's process goes away, the driver stops too.
    """

    def __init__(self) -> None:
        self._active = threading.current_thread() is threading.main_thread()
        self._asked = False
        self._parent = os.getppid()

    def before_ray(self) -> None:
        """Ignore SIGUSR2 while Ray's processes are started (they inherit it), and SIGINT for good (the job's process
        forwards a Ctrl-C as SIGUSR2)."""
        if self._active:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def after_ray(self) -> None:
        """Catch SIGUSR2 in the driver; watch the job's process."""
        if self._active:
            signal.signal(signal.SIGUSR2, self._on_usr2)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            threading.Thread(target=self._watch_parent, daemon=True, name="watch-job-process").start()

    def _on_usr2(self, signum: int, frame: object) -> None:
        if self._asked:                          # SLURM signals every process of the step, and the job forwards it
            return
        if not callable(signal.getsignal(signal.SIGUSR1)):
            return                               # Tune's fit() has not started: the job's process sends it again
        self._asked = True
        log.info("SIGUSR2: stopping the sweep (Tune saves its state)")
        os.kill(os.getpid(), signal.SIGUSR1)

    def _watch_parent(self) -> None:
        while os.getppid() == self._parent:
            time.sleep(2)
        log.warning("the job's process has gone: stopping the sweep")
        os.kill(os.getpid(), signal.SIGUSR2)
