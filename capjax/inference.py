"""Load a trained model for inference (captioning, evaluation), and export one.

`load(path)` takes either a training workdir (its newest checkpoint; only the
params are read, never the optimizer state) or a directory written by
`export` / `tools/export.py`:

  OUT/params/         the params (orbax), nothing else
  OUT/config.json     the training config
  OUT/tokenizer.model the sentencepiece tokenizer
  OUT/export.json     {"format", "step", "source"}
"""

import dataclasses
import json
import os

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from capjax import checkpoint, models, sharding, trainer
from capjax.data import tokenizer as tokenizer_lib

EXPORT_FORMAT = "capjax-params-v1"


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  model: nn.Module
  params: dict
  tokenizer: tokenizer_lib.Tokenizer
  step: int


def _local_mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def abstract_params(model, config, mesh):
  """Param shapes carrying their shardings on `mesh` (restore targets)."""
  boxed = trainer.abstract_params(model, config)
  shardings = sharding.param_shardings(boxed, mesh, sharding.rules_from_config(config))
  return sharding.with_shardings(sharding.unbox_shapes(boxed), shardings)


def is_export(path) -> bool:
  return (checkpoint.as_path(path) / "export.json").exists()


def load(path: str, step: int | None = None) -> Trained:
  """The latest (or given) checkpoint of a workdir, or an exported model, on all devices."""
  if is_export(path):
    return load_exported(path)
  ckpt_dir = f"{str(path).rstrip('/')}/checkpoints"
  config = checkpoint.saved_config(ckpt_dir, step)
  tok_path = config.tokenizer.path or f"{str(path).rstrip('/')}/tokenizer.model"
  model = models.from_config(config)
  mesh = _local_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
    params, restored_step = checkpoint.restore_params(
        ckpt_dir, abstract_params(model, config, mesh), step)
  return Trained(config, model, params, tokenizer_lib.Tokenizer(tok_path), restored_step)


def load_exported(path: str) -> Trained:
  """A model written by `export`."""
  root = checkpoint.as_path(path)
  info = json.loads((root / "export.json").read_text())
  if info.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{root} holds export format {info.get('format')!r}; expected "
                     f"{EXPORT_FORMAT!r}.")
  config = ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  model = models.from_config(config)
  mesh = _local_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(root / "params", abstract_params(model, config, mesh))
  return Trained(config, model, params, tokenizer_lib.Tokenizer(str(root / "tokenizer.model")),
                 info["step"])


def export(workdir: str, output: str, step: int | None = None) -> int:
  """Writes the params of a workdir's checkpoint, its config and tokenizer to `output`;
  returns the step exported."""
  out = checkpoint.as_path(output)
  if (out / "params").exists():
    raise FileExistsError(f"{out / 'params'} exists; choose a new --output.")
  trained = load(workdir, step)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / "params", trained.params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    config = json.loads(trained.config.to_json())
    config["tokenizer"]["path"] = ""  # the copy next to it is used
    (out / "config.json").write_text(json.dumps(config, indent=2))
    epath.Path(trained.tokenizer.path).copy(out / "tokenizer.model", overwrite=True)
    (out / "export.json").write_text(json.dumps(
        {"format": EXPORT_FORMAT, "step": trained.step, "source": os.fspath(workdir)}))
  return trained.step
