"""A run directory's layout, joined one way (`etils.epath`: local paths and gs:// alike).

  DIR/checkpoints/      orbax checkpoints (checkpoint.py)
  DIR/tokenizer.model   the tokenizer, trained on first use unless `tokenizer.path` is set
  DIR/metrics.jsonl     one JSON object a logged step (metrics_log.py)
  DIR/lock.json         who trains in DIR now (host, pid, start time); see `lock`

An export (`tools/export.py`, `trained.export`) is a directory of its own:
  OUT/params/           the params (orbax), nothing else
  OUT/config.json       the training config
  OUT/tokenizer.model   the tokenizer
  OUT/export.json       {"format", "step", "source"}
"""

import contextlib
import json
import logging
import os
import socket
import time
import uuid

from etils import epath
import numpy as np

TOKENIZER = "tokenizer.model"


def path(directory) -> epath.Path:
  """`directory` as an epath: absolute when local, as given for gs:// and other stores."""
  p = epath.Path(directory)
  return p if "://" in str(directory) else p.absolute()


def checkpoints(workdir) -> epath.Path:
  return path(workdir) / "checkpoints"


def tokenizer(workdir, config=None) -> epath.Path:
  """`config.tokenizer.path` when set, else DIR/tokenizer.model."""
  if config is not None and config.tokenizer.path:
    return path(config.tokenizer.path)
  return path(workdir) / TOKENIZER


def metrics(workdir) -> epath.Path:
  return path(workdir) / "metrics.jsonl"


def export_params(out) -> epath.Path:
  return path(out) / "params"


def export_config(out) -> epath.Path:
  return path(out) / "config.json"


def export_info(out) -> epath.Path:
  return path(out) / "export.json"


def is_export(directory) -> bool:
  return export_info(directory).exists()


LOCK = "lock.json"


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir (one line naming it)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, another user's
  return True


def _holder(lock_path: epath.Path) -> dict | None:
  try:
    return json.loads(lock_path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None  # gone, or half-written by a writer that died: treat as free


def _is_stale(holder: dict) -> bool:
  return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1))


def _create(lock_path: epath.Path, text: str) -> bool:
  """Creates the lock file if absent. Exclusive on local disks (O_EXCL); on object stores
  (gs://) a write then read-back: two trainers starting within the same second could both
  pass, which the lock does not claim to prevent there."""
  if "://" not in str(lock_path):
    try:
      fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  if lock_path.exists():
    return False
  lock_path.write_text(text)
  return lock_path.read_text() == text


@contextlib.contextmanager
def lock(workdir):
  """Holds DIR/lock.json (host, pid, start time) while a trainer runs in DIR.

  A second trainer gets a `WorkdirLockedError` naming the holder. A lock left by a process
  that no longer runs on this host is taken over with a warning; one from another host is
  reported (delete the file if that run is gone). With several processes only process 0
  takes the lock; the others learn its outcome."""
  import jax  # pylint: disable=g-import-not-at-top
  lock_path = path(workdir) / LOCK
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
        "token": uuid.uuid4().hex}
  text = json.dumps(me)
  error = None
  if jax.process_index() == 0:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while not _create(lock_path, text):
      holder = _holder(lock_path)
      if holder is None or _is_stale(holder):
        logging.warning("taking over %s, left by %s", lock_path, holder or "a writer that died")
        lock_path.unlink(missing_ok=True)
        continue
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
      error = (f"{workdir} is in use by pid {holder.get('pid')} on {holder.get('host')} "
               f"(since {since}); wait for it to end, or delete {lock_path} if it is gone.")
      break
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused and error is None:
      error = f"{workdir} is in use by another trainer (see process 0)."
  if error is not None:
    raise WorkdirLockedError(error)
  try:
    yield
  finally:
    if jax.process_index() == 0 and (_holder(lock_path) or {}).get("token") == me["token"]:
      lock_path.unlink(missing_ok=True)
