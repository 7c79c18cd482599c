"""Load a trained model from a workdir for inference (captioning, evaluation)."""

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections

from capjax import checkpoint, models, sharding, trainer
from capjax.data import tokenizer as tokenizer_lib
from capjax.optim import factory


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  model: nn.Module
  params: dict
  tokenizer: tokenizer_lib.Tokenizer
  step: int


def load(workdir: str, step: int | None = None) -> Trained:
  """Restores the latest (or given) checkpoint of `workdir` on the local devices."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  config = checkpoint.saved_config(ckpt_dir, step)
  tok_path = config.tokenizer.path or os.path.join(workdir, "tokenizer.model")
  model = models.from_config(config)
  optimizer = factory.make_optimizer(config)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
    template = jax.eval_shape(lambda: trainer.create_state(model, optimizer, config, mesh))
    shardings = trainer.state_shardings(model, optimizer, config, mesh)
    template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            template, shardings)
    state, restored_step = checkpoint.Checkpointer(ckpt_dir, 0, None).restore(template, None, step)
  return Trained(config, model, state.params, tokenizer_lib.Tokenizer(tok_path), restored_step)
