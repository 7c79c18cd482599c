"""When the training loop must stop: stop signals (preemption, Ctrl-C) and non-finite steps.

Stop signals. SIGTERM (what a TPU VM gets before preemption) and SIGINT (Ctrl-C)
set a flag; the loop finishes its step, saves, waits for the save and exits. A
second Ctrl-C interrupts at once. With several processes all must stop at the
same step or the save deadlocks:
  SIGTERM  JAX's preemption service (started by `jax.distributed.initialize`)
           catches it on any process and picks a common step;
           `reached_preemption_sync_point` is a local check, cheap every step.
  SIGINT   each process's flag is combined at log steps (one small all-gather,
           where the loop syncs with the host anyway).

Non-finite steps. The jitted step never applies a non-finite update and reports
`train/nonfinite`; reading that every step would stall the device queue, so the
flags are kept on device and read at log steps and before each save. In "stop"
mode the run ends there, naming the first bad step; the state was never touched
by it, and no checkpoint is written after it.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np


class NonFiniteError(FloatingPointError):
  pass


class StopWhileWaiting(RuntimeError):
  """A stop signal arrived while the loop waited for its next batch."""


def _preemption_service_running() -> bool:
  """Whether `jax.distributed.initialize` started the preemption service (its SIGTERM hook)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
  """Signal handlers that turn SIGTERM / SIGINT into a request to stop after a step."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}
    self._jax_handles_sigterm = jax.process_count() > 1 and _preemption_service_running()
    if threading.current_thread() is not threading.main_thread():
      return  # signals can only be handled on the main thread (e.g. tests calling train())
    signals = (signal.SIGINT,) if self._jax_handles_sigterm else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal_name == "SIGINT":
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    self.signal_name = signal.Signals(signum).name

  def should_stop(self, step: int, at_log_step: bool) -> bool:
    """Whether to stop after `step`; every process must call this at every step."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    if self._jax_handles_sigterm and multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    if at_log_step:
      flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
      if np.any(flags):
        self.signal_name = self.signal_name or "SIGINT"  # raised on another process
        return True
    return False

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class NonfiniteSteps:
  """Collects the per-step `train/nonfinite` flags without a host sync until `flush`."""

  def __init__(self, skipped: int = 0):
    self.skipped = skipped  # steps skipped so far in the run, across restarts
    self.consecutive = 0  # skipped steps in a row, up to the newest flushed step
    self._pending = []

  def add(self, step: int, flag):
    self._pending.append((step, flag))

  def flush(self) -> list[int]:
    """The steps (1-based, as logged) since the last flush whose update was skipped."""
    if not self._pending:
      return []
    steps, flags = zip(*self._pending)
    self._pending = []
    flags = jax.device_get(list(flags))
    bad = [s for s, f in zip(steps, flags) if f > 0]
    self.skipped += len(bad)
    for f in flags:
      self.consecutive = self.consecutive + 1 if f > 0 else 0
    return bad
