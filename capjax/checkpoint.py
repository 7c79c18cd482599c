"""Checkpoints of a run (orbax): everything needed to continue it exactly.

A checkpoint at step N is a directory `N/` holding the items
  state   params, optimizer state and step: sharded arrays, written asynchronously.
          No RNG is stored: the train step derives its RNG from `seed` and step.
  data    the grain iterator's position, one small JSON file per process.
  config  the run's config, so tools can rebuild the model from a workdir alone.
  meta    host-side counters (e.g. steps skipped for a non-finite loss).
orbax writes each checkpoint to a temporary directory and renames it (or, on
gs://, writes a commit marker) once complete, so a crash mid-save leaves an
incomplete checkpoint that is ignored. A committed checkpoint that fails to
restore is moved aside to `N.corrupt` and the previous one is tried.

Paths go through `epath`, so `gs://bucket/dir` works like a local directory.
"""

import json
import logging

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from capjax import workdir

CORRUPT_SUFFIX = ".corrupt"


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the state the config describes."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint of a run failed to restore."""


def _key_str(key) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_shapes(tree) -> dict[str, tuple]:
  """{"params/decoder/.../kernel": shape} in tree order, keyed as orbax names items."""
  return {"/".join(_key_str(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


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


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (all processes must call this together)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _handlers(state_handler):
  return {"state": state_handler, "config": ocp.JsonCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


class Checkpointer:
  """Asynchronous saves every `every` steps; keeps the last `keep` (0: all) plus every
  `keep_period`-th step (0: none extra)."""

  def __init__(self, directory, every: int = 0, keep: int = 0, keep_period: int = 0):
    self.directory = workdir.path(directory)
    self.every = every
    before = self._entries()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
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

  def save(self, step: int, state, data_iter=None, config=None, meta: dict | None = None):
    """Starts an asynchronous save; arrays are copied before this returns, so the
    caller may donate `state` to the next step at once."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if config is not None:
      args["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def _has_data_state(self, step: int) -> bool:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (self.directory / str(step) / "data" / name).exists()

  def check_matches(self, step: int, abstract_state):
    saved = flat_shapes(self.manager.item_metadata(step)["state"].tree)
    mismatch = first_mismatch(saved, flat_shapes(abstract_state))
    if mismatch:
      raise CheckpointMismatchError(
          f"Checkpoint {self.directory / str(step)} does not match the config: {mismatch}.")

  def _restore_step(self, step: int, abstract_state, data_iter):
    self.check_matches(step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      if self._has_data_state(step):
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      else:
        logging.warning("checkpoint %d has no data-iterator state for %d processes; the input "
                        "pipeline starts from its beginning", step, jax.process_count())
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], dict(restored["meta"] or {})

  def restore(self, abstract_state, data_iter=None):
    """(state, step, meta) from the newest checkpoint that restores, or (None, None, {}).

    `abstract_state` holds ShapeDtypeStructs with the shardings wanted now: arrays
    are read straight into that layout, whatever mesh they were saved from.
    `data_iter` (if given) is moved to the saved position in place.
    """
    tried = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self._restore_step(step, abstract_state, data_iter)
        error = None
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # damage takes many forms
        error = e
      if _all_processes(error is None):
        logging.info("restored checkpoint %s", self.directory / str(step))
        return state, step, meta
      reason = (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if error else "it failed on another process")
      logging.warning("checkpoint %s could not be restored (%s); moving it to %s%s and falling "
                      "back to the previous one", self.directory / str(step), reason, step,
                      CORRUPT_SUFFIX)
      self._set_aside(step)
      tried.append(step)
    if tried:  # starting over silently would throw the run away; let the user decide
      raise NoUsableCheckpointError(f"No checkpoint in {self.directory} could be restored (tried steps "
                         f"{tried}, now *{CORRUPT_SUFFIX}); rerun to start from scratch.")
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

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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
  """The config a checkpoint was trained with."""
  manager = _reader(directory)
  step = _step_or_latest(manager, directory, step)
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  return ml_collections.ConfigDict(restored["config"])


def restore_params(directory, abstract_params, step: int | None = None):
  """(params, step): only the params of a training checkpoint, into the shardings that
  `abstract_params` carries; the optimizer state is never read."""
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
  return restored["state"]["params"], step
