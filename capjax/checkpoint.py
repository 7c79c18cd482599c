"""Checkpoints of a run (orbax): everything needed to continue it exactly.

A checkpoint at step N is a directory `N/` holding the items
  state   params, optimizer state and step: sharded arrays, written asynchronously.
          No RNG is stored: the train step derives its RNG from `seed` and step.
  data    the grain iterator's position, one small JSON file per process.
  config  the run's config, so tools can rebuild the model from a workdir alone.
  meta    host-side counters (e.g. steps skipped for a non-finite loss).
and `N/manifest.json`: the size and sha256 of every file of those items. orbax writes each
checkpoint to a temporary directory and renames it (or, on gs://, writes a commit marker) once
complete; process 0 writes the manifest after every process has finished writing and before that
commit, so a crash or a full disk mid-save leaves an incomplete checkpoint that is ignored.

Restoring verifies a checkpoint before using it. Damage (files that differ from the manifest, or
a state holding non-finite values) moves it aside to `N.corrupt` and the previous one is tried,
every process agreeing. Anything else is not damage and renames nothing: a checkpoint that does
not fit the config or the input pipeline is a one-line `CheckpointMismatchError`, and any other
error (a network error on gs://, an OOM) is raised as it is.

Paths go through `epath`, so `gs://bucket/dir` works like a local directory.
"""

import hashlib
import json
import logging
import threading
import time

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from capjax import workdir

CORRUPT_SUFFIX = ".corrupt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "capjax-manifest-v1"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the state or the input pipeline the config describes."""


class DataStateError(CheckpointMismatchError):
  """A checkpoint lacks the data-iterator state this run needs, or it does not fit."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint's files differ from those written, or its state is not finite."""

  def __init__(self, step_dir, problem: str):
    super().__init__(f"Checkpoint {step_dir} is damaged: {problem}.")
    self.problem = problem


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint of a run is damaged."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a lost connection)."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _key_str(key) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree) -> dict:
  """{"params/decoder/.../kernel": leaf} in tree order, keyed as orbax names items."""
  return {"/".join(_key_str(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_shapes(tree) -> dict[str, tuple]:
  return {name: tuple(leaf.shape) for name, leaf in _flat(tree).items()}


def first_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
  """Describes the first array (in `expected`'s order) whose presence or shape differs."""
  for name, shape in expected.items():
    if name not in saved:
      return f"{name} {shape} is in the config but not in the checkpoint"
    if tuple(saved[name]) != shape:
      return f"{name} is {tuple(saved[name])} in the checkpoint but {shape} in the config"
  for name, shape in saved.items():
    if name not in expected:
      return f"{name} {tuple(shape)} is in the checkpoint but not in the config"
  return None


def nonfinite_arrays(tree) -> list[str]:
  """Names of the floating-point arrays of `tree` holding a NaN or an infinity."""
  floats = {name: x for name, x in _flat(tree).items() if jnp.issubdtype(x.dtype, jnp.inexact)}
  if not floats:
    return []
  finite = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))(list(floats.values()))
  return [name for name, ok in zip(floats, np.asarray(finite)) if not ok]


def _nonfinite(names: list[str]) -> str:
  return f"non-finite values in {names[0]}" + (f" and {len(names) - 1} other array(s)"
                                                if len(names) > 1 else "")


# Integrity: a manifest of every file a checkpoint's items hold.


def _item_files(step_dir) -> list[str]:
  """Relative paths of the files in a step's item directories, sorted. Files at the top of the
  step directory are orbax's bookkeeping (rewritten at commit) and the manifest itself."""
  found = []

  def walk(directory, prefix):
    for child in directory.iterdir():
      name = f"{prefix}/{child.name}" if prefix else child.name
      if child.is_dir():
        walk(child, name)
      elif prefix:
        found.append(name)

  walk(step_dir, "")
  return sorted(found)


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def write_manifest(step_dir):
  """Records the size and sha256 of every item file under `step_dir` in `step_dir/manifest.json`."""
  files = {name: [(step_dir / name).stat().length, file_sha256(step_dir / name)]
           for name in _item_files(step_dir)}
  (step_dir / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}))


def read_manifest(step_dir) -> dict | None:
  """{relative path: [size, sha256]}; None for a checkpoint written before manifests."""
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    return {name: (int(size), str(digest)) for name, (size, digest) in manifest["files"].items()}
  except (ValueError, KeyError, TypeError, AssertionError) as e:
    raise CheckpointDamagedError(step_dir, f"{MANIFEST} is unreadable ({_first_line(e)})") from e


def first_damage(step_dir, manifest: dict, share: tuple[int, int] = (0, 1)) -> str | None:
  """The first file of `manifest` that is missing, resized or changed, or None. Every file's
  size is checked; of the contents, only those of share (index, count): a process's part."""
  index, count = share
  for i, (name, (size, digest)) in enumerate(sorted(manifest.items())):
    path = step_dir / name
    if not path.exists():
      return f"{name} is missing"
    if path.stat().length != size:
      return f"{name} has {path.stat().length} bytes, {size} were written"
    if i % count == index and file_sha256(path) != digest:
      return f"{name} differs from its checksum"
  return None


def verify_files(step_dir, share: tuple[int, int] = (0, 1)) -> bool:
  """Raises CheckpointDamagedError unless `step_dir`'s files match its manifest; False when it
  has none to check (written before manifests)."""
  manifest = read_manifest(step_dir)
  if manifest is None:
    logging.warning("checkpoint %s has no %s (written by an older capjax): its files cannot be "
                    "verified", step_dir, MANIFEST)
    return False
  problem = first_damage(step_dir, manifest, share)
  if problem:
    raise CheckpointDamagedError(step_dir, problem)
  return True


def is_damage(error: Exception, verified: bool) -> bool:
  """Whether a restore error means the checkpoint is damaged: always when an integrity check
  failed; for an unverifiable (pre-manifest) checkpoint, also a read error other than OSError."""
  if isinstance(error, CheckpointDamagedError):
    return True
  return not verified and not isinstance(error, (OSError, CheckpointMismatchError))


# Every process restores the same step; these codes let them agree on what happened to it.
OK, DAMAGED, FAILED = 0, 1, 2


def _worst(code: int) -> int:
  """The largest of `code` over all processes (all processes must call this together)."""
  if jax.process_count() == 1:
    return code
  return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def _handlers(state_handler):
  return {"state": state_handler, "config": ocp.JsonCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


def _data_state_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _FirstLineOfOrbaxErrors(logging.Filter):
  """orbax logs a failed background save with a traceback from each of its threads; the
  Checkpointer raises that failure as one CheckpointSaveError, so its records keep one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "/orbax/" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_ERRORS = _FirstLineOfOrbaxErrors()


def _join_orbax_threads(timeout_s: float = 60):
  """Lets the writers of a failed save's other items finish: left running at interpreter exit,
  each would fail to schedule its next write and log a traceback after the run's last line."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax") and thread is not threading.current_thread():
      thread.join(max(0.0, deadline - time.monotonic()))


class Checkpointer:
  """Asynchronous saves every `every` steps; keeps the last `keep` (0: all) plus every
  `keep_period`-th step (0: none extra)."""

  def __init__(self, directory, every: int = 0, keep: int = 0, keep_period: int = 0):
    self.directory = workdir.path(directory)
    self.every = every
    self._saving = None  # the step whose save is in flight
    self._failed = None  # a CheckpointSaveError already raised
    logging.getLogger("absl").addFilter(_ORBAX_ERRORS)  # once: filters are a set
    before = self._entries()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=_handlers(ocp.StandardCheckpointHandler()))
    steps = {str(s) for s in self.manager.all_steps()}
    for name in sorted(before - steps):
      if name[:1].isdigit() and CORRUPT_SUFFIX not in name and jax.process_index() == 0:
        logging.warning("ignoring incomplete checkpoint %s (interrupted while saving)",
                        self.directory / name)

  def _entries(self) -> set[str]:
    return {p.name for p in self.directory.iterdir()} if self.directory.exists() else set()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def _write_manifest(self):
    """orbax calls this on process 0 once every process has written step `_saving`, before the
    commit: the manifest goes into the temporary directory that the commit makes final."""
    final = self.directory / str(self._saving)
    temporary = ocp.path.atomicity_defaults.get_default_temporary_path_class(final)
    write_manifest(temporary.from_final(final).get())

  def _save_error(self, error: Exception) -> CheckpointSaveError:
    self._failed = CheckpointSaveError(
        f"Could not save checkpoint {self.directory / str(self._saving)} ({_first_line(error)}); "
        f"it is incomplete and will be ignored: rerun to resume from the newest complete one.")
    return self._failed

  def save(self, step: int, state, data_iter=None, config=None, meta: dict | None = None):
    """Starts an asynchronous save; arrays are copied before this returns, so the
    caller may donate `state` to the next step at once."""
    self.wait()  # the previous save's manifest must be written before `_saving` moves on
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if config is not None:
      args["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except  # a full disk, a lost connection
      raise self._save_error(e) from e

  def wait(self):
    """Waits for a save in flight; CheckpointSaveError if it failed."""
    if self._failed is not None:
      raise self._failed
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e

  def close(self):
    """Waits for a save in flight and releases orbax; a failure is raised only once."""
    failed = self._failed
    try:
      self.wait()
    except CheckpointSaveError:
      _join_orbax_threads()
      if failed is None:
        raise
    else:
      self.manager.close()

  def check_matches(self, step: int, abstract_state):
    saved = flat_shapes(self.manager.item_metadata(step)["state"].tree)
    mismatch = first_mismatch(saved, flat_shapes(abstract_state))
    if mismatch:
      raise CheckpointMismatchError(
          f"Checkpoint {self.directory / str(step)} does not match the config: {mismatch}.")

  def _has_data_state(self, step: int) -> bool:
    return (self.directory / str(step) / "data" / _data_state_file()).exists()

  def _data_state_to_restore(self, step: int, allow_data_restart: bool) -> bool:
    """Whether every process has its data-iterator state in `step`; DataStateError when not,
    unless `allow_data_restart`."""
    if _worst(OK if self._has_data_state(step) else FAILED) == OK:
      return True
    where = (f"Checkpoint {self.directory / str(step)} has no data-iterator state for "
             f"{jax.process_count()} process(es) (saved without it or by another process count)")
    if not allow_data_restart:
      raise DataStateError(f"{where}: resuming would not be exact; set "
                           "--config.checkpoint.allow_data_restart=True to resume with the input "
                           "pipeline from its beginning.")
    logging.warning("%s; the input pipeline starts from its beginning "
                    "(checkpoint.allow_data_restart=True)", where)
    return False

  def _restore_state(self, step: int, abstract_state, verified: bool):
    """(code, (state, meta) or the error): the state if every process read it and it is finite."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      result, code = (restored["state"], dict(restored["meta"] or {})), OK
    except Exception as e:  # pylint: disable=broad-except  # sorted by is_damage
      result, code = e, DAMAGED if is_damage(e, verified) else FAILED
    code = _worst(code)
    if code == OK:
      bad = nonfinite_arrays(result[0])
      if bad:
        result, code = CheckpointDamagedError(self.directory / str(step), _nonfinite(bad)), DAMAGED
    return code, result

  def _restore_data(self, step: int, data_iter):
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      error = None
    except Exception as e:  # pylint: disable=broad-except  # the same on every process
      error = e
    if _worst(FAILED if error else OK) == OK:
      return
    reason = _first_line(error) if error else "it failed on another process"
    raise DataStateError(
        f"Checkpoint {self.directory / str(step)} has a data-iterator state that does not fit "
        f"this input pipeline ({reason}); data.num_workers and the process count must be those "
        f"of the run that saved it.") from error

  def _verify(self, step: int) -> tuple[int, object]:
    """(code, whether verified or the error), every process checking its share of the files."""
    try:
      verified = verify_files(self.directory / str(step),
                              (jax.process_index(), jax.process_count()))
      return _worst(OK), verified
    except CheckpointDamagedError as e:
      return _worst(DAMAGED), e
    except Exception as e:  # pylint: disable=broad-except
      return _worst(FAILED), e

  def restore(self, abstract_state, data_iter=None, *, allow_data_restart: bool = False):
    """(state, step, meta) from the newest intact checkpoint, or (None, None, {}).

    `abstract_state` holds ShapeDtypeStructs with the shardings wanted now: arrays
    are read straight into that layout, whatever mesh they were saved from.
    `data_iter` (if given) is moved to the saved position in place; a checkpoint without that
    position is refused unless `allow_data_restart`.
    """
    tried = []
    for step in reversed(self.all_steps()):
      code, result = self._verify(step)
      if code == OK:
        verified = result
        self.check_matches(step, abstract_state)
        with_data = data_iter is not None and self._data_state_to_restore(step, allow_data_restart)
        code, result = self._restore_state(step, abstract_state, verified)
      if code == FAILED:
        if isinstance(result, Exception):
          raise result
        raise RuntimeError(f"Restoring checkpoint {self.directory / str(step)} failed on "
                           "another process.")
      if code == OK:
        state, meta = result
        if with_data:
          self._restore_data(step, data_iter)
        logging.info("restored checkpoint %s", self.directory / str(step))
        return state, step, meta
      reason = (result.problem if isinstance(result, CheckpointDamagedError) else
                _first_line(result) if isinstance(result, Exception) else
                "damaged on another process")
      logging.warning("checkpoint %s could not be restored (%s); moving it to %s%s and falling "
                      "back to the previous one", self.directory / str(step), reason, step,
                      CORRUPT_SUFFIX)
      self._set_aside(step)
      tried.append(step)
    if tried:  # starting over silently would throw the run away; let the user decide
      raise NoUsableCheckpointError(
          f"No checkpoint in {self.directory} could be restored (tried steps {tried}, now "
          f"*{CORRUPT_SUFFIX}); rerun with --config.train.allow_restart=True to start from scratch.")
    return None, None, {}

  def _set_aside(self, step: int):
    """Renames a damaged step out of orbax's view so the step can be saved again."""
    if jax.process_index() == 0:
      target = self.directory / f"{step}{CORRUPT_SUFFIX}"
      n = 1
      while target.exists():
        target, n = self.directory / f"{step}{CORRUPT_SUFFIX}{n}", n + 1
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()


# Read-only access for tools (export, captioning, evaluation): nothing is renamed.


def _reader(directory, state_handler=None) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      workdir.path(directory), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=_handlers(state_handler or ocp.PyTreeCheckpointHandler()))


def _step_or_latest(manager, directory, step):
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {directory}; train first with python -m capjax.train.")
  return step


def saved_config(directory, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with (not verified: see `newest_intact`)."""
  manager = _reader(directory)
  step = _step_or_latest(manager, directory, step)
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  return ml_collections.ConfigDict(restored["config"])


def restore_params(directory, abstract_params, step: int | None = None):
  """(params, step): only the params of a training checkpoint, into the shardings that
  `abstract_params` carries; the optimizer state is never read. CheckpointDamagedError when
  they are not finite."""
  manager = _reader(directory)
  step = _step_or_latest(manager, directory, step)
  saved = flat_shapes(manager.item_metadata(step)["state"].tree)
  mismatch = first_mismatch({k: v for k, v in saved.items() if k.startswith("params/")},
                            flat_shapes({"params": abstract_params}))
  if mismatch:
    raise CheckpointMismatchError(f"Checkpoint {directory}/{step} does not match the config: "
                                  f"{mismatch}.")
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item))
  restored = manager.restore(step, args=ocp.args.Composite(state=args))
  manager.close()
  params = restored["state"]["params"]
  bad = nonfinite_arrays({"params": params})
  if bad:
    raise CheckpointDamagedError(workdir.path(directory) / str(step), _nonfinite(bad))
  return params, step


def newest_intact(directory, load, step: int | None = None):
  """`load(step)` for `step`, or else for the newest checkpoint that is intact: its files match
  its manifest and `load` finds no damage. A damaged one is skipped with a warning (and left in
  place); NoUsableCheckpointError when none is intact."""
  directory = workdir.path(directory)
  manager = _reader(directory)
  saved = sorted(manager.all_steps(), reverse=True)
  manager.close()
  if not saved:
    raise FileNotFoundError(
        f"No checkpoint in {directory}; train first with python -m capjax.train.")
  if step is not None and step not in saved:
    raise FileNotFoundError(f"No checkpoint of step {step} in {directory} (it has steps "
                            f"{sorted(saved)}).")
  steps = saved if step is None else [step]
  damaged = []
  for candidate in steps:
    verified = False
    try:
      verified = verify_files(directory / str(candidate))
      result = load(candidate)
    except Exception as e:  # pylint: disable=broad-except  # sorted by is_damage
      if not is_damage(e, verified):
        raise
      if not isinstance(e, CheckpointDamagedError):  # an unverifiable checkpoint's read error
        e = CheckpointDamagedError(directory / str(candidate), _first_line(e))
      if step is not None:
        raise e
      logging.warning("%s; trying the previous checkpoint", str(e).splitlines()[0])
      damaged.append(candidate)
      continue
    if damaged:
      logging.warning("using checkpoint %s: the newer %s damaged", directory / str(candidate),
                      f"step {damaged[0]} is" if len(damaged) == 1 else f"steps {damaged} are")
    return result
  raise NoUsableCheckpointError(f"No intact checkpoint in {directory} (damaged: steps {damaged}).")
