"""SigLiT: a trained CapPa vision tower, frozen, and a text tower trained with the SigLIP
sigmoid loss on image-caption pairs (LiT with SigLIP's loss; seed 003 reads zero-shot accuracy
off it). big_vision: `trainers/proj/image_text/siglip.py`, `configs/proj/image_text/
siglip_lit_coco.py`.

The tower comes from `init.image_tower` (a capjax workdir or export). Its sizes are not in the
preset: when a run starts fresh, `prepare_run` copies `RUN_KEYS` from the tower's saved config
(and its tokenizer into the workdir: SigLiT reads the same captions, so the tower's run's
tokenizer fits, and a workdir that holds a different one is refused); `pretrained_params` then
loads its params into `encoder`, which the optimizer's trainable mask freezes (no optimizer
state, no update, no backward pass through it). The pooling head, the text tower, temperature
and bias train. Without `init.image_tower`: a warning, and a random tower of the preset's sizes.

Analytic FLOPs per example: the frozen tower's forward once (no backward is computed for it),
plus 3 x forward of what trains: the pooling head (MAP: q/out 2*D*D, k/v 2*T*D*D, attention
2*T*D, GeGLU 3*D*M), the image projection, the text tower (per layer 4*L*W*W + 2*L*L*W +
3*L*W*M_text, plus its head W*E) and the logits row (B*E: each example meets the whole batch).
"""

import functools
import logging

import jax
import jax.numpy as jnp

from capjax import checkpoint, config as config_lib, tasks, trained as trained_lib
from capjax.models import layers, two_towers
from capjax.tasks import base, cappa

# What a SigLiT run takes from its image tower's run: the tower's sizes and input, and what its
# tokenizer was made for (vocabulary, caption cleaning).
TOWER_KEYS = ("model.patch_size", "model.width", "model.enc_depth", "model.mlp_dim",
              "model.num_heads", "model.num_registers", "data.image_size")
RUN_KEYS = TOWER_KEYS + ("model.vocab_size", "data.lowercase", "data.strip_punctuation")
SOURCE_TASKS = ("cappa", "siglit")  # their vision tower is `encoder` (models/vit.py)


def sigmoid_loss(zimg_BxE, ztxt_BxE, temperature, bias):
  """SigLIP: logits = zimg . ztxt^T * t + b; labels +1 on the diagonal (the pairs), -1
  elsewhere; -sum(log_sigmoid(labels * logits)) per image, mean over images."""
  logits_BxB = jnp.einsum("ie,je->ij", zimg_BxE.astype(jnp.float32),
                          ztxt_BxE.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST) * temperature + bias
  labels_BxB = 2.0 * jnp.eye(logits_BxB.shape[0]) - 1.0
  return jnp.mean(-jnp.sum(jax.nn.log_sigmoid(labels_BxB * logits_BxB), axis=-1))


def _run_values(config, other) -> dict:
  """`RUN_KEYS` of `other` (the tower's run, or this run's checkpoint), and its `data.dir` when
  `config` reads the same data without naming a folder."""
  values = {k: base.get_key(other, k) for k in RUN_KEYS}
  if not config.data.dir and config.data.name == other.data.name:
    values["data.dir"] = other.data.dir
  return values


@tasks.register("siglit")
class SigLiT(base.Task):
  """Batches: {"image": uint8[B, S, S, 3], "tokens": int32[B, max_len + 1]} (BOS .. EOS PAD);
  the text tower reads the tokens after BOS."""

  @classmethod
  def check_config(cls, config):
    m = config.model
    for key in ("vocab_size", "patch_size", "width", "enc_depth", "mlp_dim", "num_heads",
                "scan_unroll"):
      config_lib.check_range(f"model.{key}", m[key], 1)
    for key in ("width", "depth", "mlp_dim", "num_heads"):
      config_lib.check_range(f"model.text.{key}", m.text[key], 1)
    config_lib.check_range("model.max_len", m.max_len, 2)
    config_lib.check_range("model.num_registers", m.num_registers, 0)
    config_lib.check_range("model.embed_dim", m.embed_dim, 0)
    if not m.temperature_init > 0:
      raise config_lib.ConfigError(
          f"model.temperature_init={m.temperature_init!r} is out of range: expected > 0.")
    if m.image_pool not in two_towers.IMAGE_POOLS:
      raise config_lib.ConfigError(f"model.image_pool={m.image_pool!r}; expected one of "
                                   f"{two_towers.IMAGE_POOLS}.")
    if m.image_pool == "registers" and not m.num_registers:
      raise config_lib.ConfigError("model.image_pool='registers' needs an image tower with "
                                   "registers (model.num_registers=0).")
    try:
      layers.check_matmul_policy(m.matmul_policy)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    if config.data.image_size % m.patch_size:
      raise config_lib.ConfigError(
          f"data.image_size={config.data.image_size} is not divisible by "
          f"model.patch_size={m.patch_size}.")
    for key, width, heads in (("model.width", m.width, m.num_heads),
                              ("model.text.width", m.text.width, m.text.num_heads)):
      if width % heads:
        raise config_lib.ConfigError(f"{key}={width} is not divisible by its number of heads "
                                     f"({heads}).")

  @classmethod
  def prepare_run(cls, config, workdir):
    resumed = base.resumed_config(workdir)
    if resumed is not None:  # the checkpoint has the tower; init.image_tower is not read again
      return base.with_values(config, _run_values(config, resumed),
                              f"the checkpoint in {workdir}")
    source = config.init.image_tower
    if not source:
      logging.warning("init.image_tower is not set: SigLiT trains on a randomly initialised "
                      "image tower (pass --config.init.image_tower=WORKDIR of a trained CapPa)")
      return config
    try:
      source_config, source_tokenizer = trained_lib.saved_config(source)
    except FileNotFoundError as e:
      raise config_lib.ConfigError(f"init.image_tower={source}: {e}") from None
    if source_config.task not in SOURCE_TASKS:
      raise config_lib.ConfigError(
          f"init.image_tower={source} holds a task={source_config.task!r} model; SigLiT takes "
          f"the vision tower of one of {SOURCE_TASKS}.")
    config = base.with_values(config, _run_values(config, source_config),
                              f"init.image_tower={source}")
    base.install_tokenizer(config, workdir, source_tokenizer.read_bytes(),
                           f"init.image_tower={source} ({source_tokenizer})")
    return config

  def build_model(self):
    c, m = self.config, self.config.model
    return two_towers.TwoTowers(
        patch_size=m.patch_size, width=m.width, depth=m.enc_depth, mlp_dim=m.mlp_dim,
        num_heads=m.num_heads, num_registers=m.num_registers, vocab_size=m.vocab_size,
        max_len=m.max_len, text_width=m.text.width, text_depth=m.text.depth,
        text_mlp_dim=m.text.mlp_dim, text_num_heads=m.text.num_heads, pad_id=self.special.pad,
        image_pool=m.image_pool, embed_dim=m.embed_dim, temperature_init=m.temperature_init,
        bias_init=m.bias_init, remat_policy=m.remat_policy, dtype=jnp.dtype(c.dtype),
        scan_unroll=m.scan_unroll, matmul_policy=m.matmul_policy)

  def batch_spec(self, batch_size):
    return base.caption_batch_spec(self.config, batch_size)

  def init_inputs(self):
    s, length = self.config.data.image_size, self.config.model.max_len
    return jnp.zeros((1, s, s, 3), self.dtype), jnp.zeros((1, length), jnp.int32)

  def trainable(self, params):
    """The image tower (`encoder`) is frozen; its pooling head, the text tower, temperature
    and bias train."""
    return {name: jax.tree.map(lambda _, t=name != "encoder": t, sub)
            for name, sub in params.items()}

  def pretrained_params(self, params):
    source = self.config.init.image_tower
    if not source:
      return params
    tower = trained_lib.load(source).params["encoder"]
    mismatch = checkpoint.first_mismatch(checkpoint.flat_shapes(tower),
                                         checkpoint.flat_shapes(params["encoder"]))
    if mismatch:
      raise config_lib.ConfigError(
          f"init.image_tower={source} does not fit this config's image tower (model.*): "
          f"{mismatch}.")
    return {**params, "encoder": tower}

  def _losses(self, params, batch):
    images = base.normalize_images(batch["image"], self.dtype)
    zimg, ztxt, t, b = self.model.apply({"params": params}, images, batch["tokens"][:, 1:])
    return sigmoid_loss(zimg, ztxt, t, b), t, b

  def train_loss(self, params, batch, rng):
    del rng
    loss, t, b = self._losses(params, batch)
    return loss, {"temperature": t, "bias": b}

  def eval_loss(self, params, batch):
    return self._losses(params, batch)[0]

  def flops_per_example(self):
    c, m = self.config, self.config.model
    d, e = m.width, m.embed_dim or m.width
    tokens = (c.data.image_size // m.patch_size) ** 2 + m.num_registers
    head = (2 * d * d + 2 * tokens * d * d + 2 * tokens * d + 3 * d * m.mlp_dim
            if m.image_pool == "map" else 0) + (d * e if m.embed_dim else 0)
    w, length = m.text.width, m.max_len
    text = m.text.depth * (4 * length * w * w + 2 * length * length * w
                           + 3 * length * w * m.text.mlp_dim) + w * e
    logits = c.train.batch_size * e
    return 2.0 * (cappa.encoder_macs(m, c.data.image_size) + 3 * (head + text + logits))

  def predict_fns(self):
    return {"encode_images": self.encode_images, "encode_texts": self.encode_texts}

  @functools.partial(jax.jit, static_argnums=0)
  def encode_images(self, params, images_uint8):
    """float32[B, E]: unit-norm image embeddings."""
    images = base.normalize_images(images_uint8, self.dtype)
    return self.model.apply({"params": params}, images, method="embed_images")

  @functools.partial(jax.jit, static_argnums=0)
  def encode_texts(self, params, tokens_BxL1):
    """float32[B, E]: unit-norm embeddings of token rows as the tokenizer writes them
    (`[BOS .. EOS PAD ..]`)."""
    return self.model.apply({"params": params}, tokens_BxL1[:, 1:], method="embed_texts")
