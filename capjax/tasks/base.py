"""What a model family gives the framework: its module, inputs, losses, FLOPs, trainable
params and predict functions.

The train step (`capjax/trainer.py`) calls only `train_loss`; validation only `eval_loss`;
the assembly (`capjax/setup.py`) only `init_params`, `pretrained_params`, `batch_spec`,
`trainable` and `flops_per_example`; the trainer `prepare_run` once before it builds anything;
evaluators only `predict_fns()` (as big_vision's evaluators consume a family's predict functions
and nothing else). Params are a plain pytree; batches are dicts of arrays whose keys and shapes
`batch_spec` states.
"""

import abc
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def normalize_images(images_uint8, dtype):
  """uint8 [0, 255] -> dtype [-1, 1], on device."""
  return (images_uint8.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


def caption_batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What the input pipeline yields for captioning: uint8 images and `[BOS .. EOS PAD ..]`
  token rows of `model.max_len + 1`."""
  s, length = config.data.image_size, config.model.max_len
  return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8),
          "tokens": jax.ShapeDtypeStruct((batch_size, length + 1), jnp.int32)}


class Task(abc.ABC):
  """One model family. Subclasses implement the abstract methods; `self.model` is built once."""

  def __init__(self, config, special_ids):
    self.config = config
    self.special = special_ids  # tokenizer.SpecialIds: pad, bos, eos, mask
    self.dtype = jnp.dtype(config.dtype)
    self.model = self.build_model()

  @abc.abstractmethod
  def build_model(self) -> nn.Module:
    """The Flax module, from `self.config`."""

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch, as the input pipeline yields it."""

  @abc.abstractmethod
  def init_inputs(self) -> tuple:
    """Example inputs for `model.init` (batch of one)."""

  @abc.abstractmethod
  def train_loss(self, params, batch: dict, rng) -> tuple[jax.Array, dict]:
    """(scalar float32 loss, {name: scalar} logged as train/<name})."""

  @abc.abstractmethod
  def eval_loss(self, params, batch: dict) -> jax.Array:
    """The scalar validation loss (deterministic)."""

  @abc.abstractmethod
  def flops_per_example(self) -> float:
    """Analytic training FLOPs (forward + backward) of one example: MFU and the pod plan."""

  @classmethod
  def check_config(cls, config):
    """Raises `config.ConfigError` (one line naming the key) for values this family cannot
    train with; runs at config load time, before anything is compiled or written."""
    del config

  @classmethod
  def prepare_run(cls, config, workdir: str):
    """The config a run in `workdir` trains with (saved with its checkpoints). Called once by
    the trainer before it builds anything. A family with pretrained parts (`config.init.*`)
    fills in here the keys it takes from them (a tower's sizes, from the source's saved config;
    never its params) and may put the source's tokenizer in `workdir`; a resumed run takes those
    keys from its own checkpoint's config instead, so the sources are not read again. Raises
    `config.ConfigError` (one line) when a source does not fit."""
    del workdir
    return config

  def init_params(self, rng):
    """Boxed params (carrying logical axis names). Traced (`jax.eval_shape`, jit): no I/O."""
    return self.model.init(rng, *self.init_inputs())["params"]

  def pretrained_params(self, params):
    """`params` (fresh from `init_params`, unboxed, on the mesh) with the pretrained parts the
    config names loaded; host arrays are fine: the caller puts the result on the mesh with the
    state's shardings. Called once when a run starts fresh, never on resume (the checkpoint has
    them). Returns `params` itself when there is nothing to load."""
    return params

  def trainable(self, params) -> Any:
    """Bools with `params`' structure: False for frozen params (no optimizer state, no update).
    None: everything trains."""
    del params
    return None

  def predict_fns(self) -> dict[str, Callable]:
    """Functions of (params, ...) the evaluators use, e.g. "encode_images", "score_captions",
    "generate"; each is jitted by the task."""
    return {}
