"""What a model family gives the framework: its module, inputs, losses, FLOPs, trainable
params and predict functions.

The train step (`capjax/trainer.py`) calls only `train_loss`; validation only `eval_loss`;
the assembly (`capjax/setup.py`) only `init_params`, `pretrained_params`, `batch_spec`,
`trainable` and `flops_per_example`; the trainer `prepare_run` once before it builds anything;
evaluators only `predict_fns()` (as big_vision's evaluators consume a family's predict functions
and nothing else); the captioner `decoder()` and `pixels()`. Params are a plain pytree; batches are dicts of arrays whose keys and shapes
`batch_spec` states.
"""

import abc
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax import config as config_lib
from capjax.decode import steps as decode_steps


def normalize_images(images_uint8, dtype):
  """uint8 [0, 255] -> dtype [-1, 1], on device."""
  return (images_uint8.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


def caption_batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What the input pipeline yields for captioning: uint8 images and `[BOS .. EOS PAD ..]`
  token rows of `model.max_len + 1`."""
  s, length = config.data.image_size, config.model.max_len
  return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8),
          "tokens": jax.ShapeDtypeStruct((batch_size, length + 1), jnp.int32)}


def get_key(config, key: str):
  """config["a.b.c"] for a dotted key."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def with_values(config, values: dict, origin: str):
  """A copy of `config` with `values` ({dotted key: value}) set, validated and locked; the
  values are printed (naming `origin`), changed or not. `config` itself when nothing changes."""
  if values and jax.process_index() == 0:
    print(f"{config.task}: from {origin}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()),
          file=sys.stderr)
  changed = {k: v for k, v in values.items() if get_key(config, k) != v}
  if not changed:
    return config
  config = config.copy_and_resolve_references()
  for key, value in changed.items():
    *parents, leaf = key.split(".")
    node = get_key(config, ".".join(parents))
    with node.ignore_type():
      node[leaf] = value
  config_lib.validate(config)
  config.lock()
  return config


def resumed_config(workdir: str):
  """The config of the run's newest checkpoint in `workdir` (a resumed run), or None."""
  from capjax import trained, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not workdir_lib.checkpoints(workdir).exists():
    return None
  try:
    return trained.saved_config(workdir)[0]
  except FileNotFoundError:  # an empty checkpoints folder
    return None


def install_tokenizer(config, workdir: str, wanted: bytes, source: str):
  """Puts a pretrained source's tokenizer (the file's bytes) where the run reads its tokenizer;
  refuses a different one already there, or a `tokenizer.path` that is not it (one line)."""
  from capjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return  # the trainer syncs the processes before anyone reads it
  target = workdir_lib.tokenizer(workdir, config)
  if target.exists() and target.read_bytes() != wanted:
    where = (f"tokenizer.path={config.tokenizer.path}" if config.tokenizer.path else str(target))
    raise config_lib.ConfigError(
        f"{where} is not the tokenizer of {source}; a run reads its captions with that "
        "tokenizer: use a new --workdir and leave tokenizer.path empty.")
  if not target.exists():
    if config.tokenizer.path:
      raise config_lib.ConfigError(
          f"tokenizer.path={config.tokenizer.path} does not exist; this run uses the tokenizer "
          f"of {source}: leave tokenizer.path empty.")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(wanted)


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

  def pixels(self, images_uint8):
    """uint8 images -> the model's input (default: [-1, 1] in the compute dtype)."""
    return normalize_images(images_uint8, self.dtype)

  def decoder(self) -> decode_steps.Decoder | None:
    """What `capjax.decode` and the captioner decode this family with (images as `pixels`
    makes them), or None for a family that does not caption. Default: the model's own
    `encode` / `decode` methods (CapPa's)."""
    if all(callable(getattr(self.model, m, None)) for m in ("encode", "decode")):
      return decode_steps.EncoderDecoder(self.model)
    return None

  def predict_fns(self) -> dict[str, Callable]:
    """Functions of (params, ...) the evaluators use, e.g. "encode_images", "score_captions",
    "generate"; each is jitted by the task."""
    return {}
