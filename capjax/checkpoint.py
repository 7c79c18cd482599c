"""orbax CheckpointManager wrapper: train state, data iterator state and config, saved together."""

import json
import logging
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def _abstract(tree):
  """ShapeDtypeStructs carrying each array's sharding, so restore lands in the current layout."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, tree)


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeping the last `keep`."""

  def __init__(self, directory: str, every: int, keep: int | None, keep_period: int | None = None):
    self.directory = directory
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iter, config: ml_collections.ConfigDict):
    args = {"state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(json.loads(config.to_json()))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, state_template, data_iter, step: int | None = None):
    """Returns (state, step) from `step` (default: latest); data_iter is restored in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      return state_template, None
    args = {"state": ocp.args.StandardRestore(_abstract(state_template))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    logging.info("restored checkpoint at step %d from %s", step, self.directory)
    return restored["state"], step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def saved_config(directory: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with."""
  manager = ocp.CheckpointManager(os.path.abspath(directory) if "://" not in directory else directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory}; train first with python -m capjax.train.")
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  return ml_collections.ConfigDict(restored["config"])
