"""A trained model: load it from a workdir or an export, and write an export.

`load(path)` takes either a training workdir (its newest checkpoint; only the params are
read, never the optimizer state) or a directory written by `export` / `tools/export.py`
(layout in `capjax/workdir.py`). What captioning, evaluation and serving use.
"""

import dataclasses
import json
import os

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from capjax import checkpoint, config as config_lib, sharding, tasks, workdir
from capjax.data import tokenizer as tokenizer_lib

EXPORT_FORMAT = "capjax-params-v1"


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  task: tasks.Task
  params: dict
  tokenizer: tokenizer_lib.Tokenizer
  step: int

  def predict_fns(self) -> dict:
    return self.task.predict_fns()


def _local_mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def _abstract_params(task, rules, mesh):
  """Param shapes carrying their shardings on `mesh` (restore targets)."""
  boxed = jax.eval_shape(task.init_params, jax.random.key(0))
  shardings = sharding.param_shardings(boxed, mesh, rules)
  return sharding.with_shardings(sharding.unbox_shapes(boxed), shardings)


def _restore(config, tok, restore_fn) -> tuple[tasks.Task, dict, int]:
  task = tasks.get(config, tok.special)
  mesh, rules = _local_mesh(), sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, step = restore_fn(_abstract_params(task, rules, mesh))
  return task, params, step


def saved_config(path: str) -> tuple[ml_collections.ConfigDict, epath.Path]:
  """(config, tokenizer file) of a workdir's newest checkpoint or of an export; no params read
  (what a run that builds on a trained model needs to know before it builds anything)."""
  if workdir.is_export(path):
    config = config_lib.from_saved(json.loads(workdir.export_config(path).read_text()))
    return config, workdir.tokenizer(path)
  ckpt_dir = workdir.checkpoints(path)
  if not ckpt_dir.exists():
    raise FileNotFoundError(f"{workdir.path(path)} is neither a capjax workdir with checkpoints "
                            "nor an export.")
  config = config_lib.from_saved(checkpoint.saved_config(ckpt_dir).to_dict())
  return config, workdir.tokenizer(path, config)


def load(path: str, step: int | None = None) -> Trained:
  """The latest (or given) checkpoint of a workdir, or an exported model, on all devices.

  A workdir's checkpoint is verified as training verifies it (`checkpoint.newest_intact`): a
  damaged newest one gives way to the previous one with a warning; a damaged `step` is a
  CheckpointDamagedError, and none intact a NoUsableCheckpointError."""
  if workdir.is_export(path):
    return load_exported(path)
  return checkpoint.newest_intact(workdir.checkpoints(path),
                                  lambda s: _load_checkpoint(path, s), step)


def _load_checkpoint(path: str, step: int) -> Trained:
  ckpt_dir = workdir.checkpoints(path)
  config = config_lib.from_saved(checkpoint.saved_config(ckpt_dir, step).to_dict())
  tok = tokenizer_lib.Tokenizer(str(workdir.tokenizer(path, config)))
  task, params, restored_step = _restore(
      config, tok, lambda abstract: checkpoint.restore_params(ckpt_dir, abstract, step))
  return Trained(config, task, params, tok, restored_step)


def load_exported(path: str) -> Trained:
  """A model written by `export`."""
  info = json.loads(workdir.export_info(path).read_text())
  if info.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{workdir.path(path)} holds export format {info.get('format')!r}; "
                     f"expected {EXPORT_FORMAT!r}.")
  config = config_lib.from_saved(json.loads(workdir.export_config(path).read_text()))
  tok = tokenizer_lib.Tokenizer(str(workdir.tokenizer(path)))

  def restore(abstract):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(workdir.export_params(path), abstract), info["step"]

  task, params, step = _restore(config, tok, restore)
  return Trained(config, task, params, tok, step)


def export(source: str, output: str, step: int | None = None) -> int:
  """Writes the params of a workdir's checkpoint, its config and tokenizer to `output`;
  returns the step exported."""
  if workdir.export_params(output).exists():
    raise FileExistsError(f"{workdir.export_params(output)} exists; choose a new --output.")
  trained = load(source, step)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(workdir.export_params(output), trained.params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    config = json.loads(trained.config.to_json())
    config["tokenizer"]["path"] = ""  # the copy next to it is used
    workdir.export_config(output).write_text(json.dumps(config, indent=2))
    workdir.path(trained.tokenizer.path).copy(workdir.tokenizer(output), overwrite=True)
    workdir.export_info(output).write_text(json.dumps(
        {"format": EXPORT_FORMAT, "step": trained.step, "source": os.fspath(source)}))
  return trained.step


def randomly_initialised(trained: Trained, seed: int = 0) -> Trained:
  """The same model with freshly initialised params (step 0): the representation evals'
  baseline."""
  params = jax.jit(lambda rng: nn.meta.unbox(trained.task.init_params(rng)))(
      jax.random.key(seed))
  return dataclasses.replace(trained, params=params, step=0)
