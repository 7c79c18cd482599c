"""CapPa (seed 003): ViT with registers + cross-attention decoder, trained per example by
autoregressive captioning or, with probability `objective.masked_pred_prob`, by parallel
prediction (decoder input all MASK, bidirectional self-attention). Both use the same token
cross-entropy on the caption; validation reports the captioning loss alone (as seed 003).

Analytic forward FLOPs per example = 2 x (multiply-adds of every matmul), attention included:
  encoder, T = patches + registers tokens, per layer:
    4*T*D*D (q,k,v,o) + 2*T*T*D (scores and weighted sum) + 3*T*D*M (GeGLU gate/up/down)
  decoder, L tokens, per layer:
    4*L*D*D + 2*L*L*D (self) + 2*L*D*D + 2*T*D*D + 2*L*T*D (cross) + 3*L*D*M
  plus patch embedding N*P*D and the vocabulary projection L*D*V.
Training = 3 x forward (backward is twice the forward).
"""

import functools

import jax
import jax.numpy as jnp

from capjax import config as config_lib, decode, objectives, tasks
from capjax.models import cappa as cappa_model, layers
from capjax.tasks import base


def parallel_prediction_rows(rng, batch_size: int, masked_pred_prob: float):
  """bool[B]: True for the examples trained by parallel prediction this step."""
  return jax.random.uniform(rng, (batch_size,)) < masked_pred_prob


def self_attention_mask(parallel_B, length: int):
  """bool[B, 1, L, L]: causal for captioning rows, all-True for parallel rows."""
  causal_LxL = objectives.causal_mask(length)
  return (causal_LxL[None] | parallel_B[:, None, None])[:, None]


def mask_inputs(inputs_BxL, parallel_B, mask_id: int):
  return jnp.where(parallel_B[:, None], jnp.asarray(mask_id, inputs_BxL.dtype), inputs_BxL)


def cappa_inputs(tokens_BxL1, rng, masked_pred_prob: float, mask_id: int):
  """Returns (decoder inputs, targets, self-attention mask, parallel rows)."""
  inputs_BxL, targets_BxL = objectives.split_inputs_targets(tokens_BxL1)
  parallel_B = parallel_prediction_rows(rng, inputs_BxL.shape[0], masked_pred_prob)
  inputs_BxL = mask_inputs(inputs_BxL, parallel_B, mask_id)
  return inputs_BxL, targets_BxL, self_attention_mask(parallel_B, inputs_BxL.shape[1]), parallel_B


def cappa_loss(apply_fn, params, images, tokens_BxL1, rng, *, masked_pred_prob: float,
               mask_id: int, pad_id: int, normalization: str = "per_example"):
  inputs_BxL, targets_BxL, mask_Bx1xLxL, parallel_B = cappa_inputs(
      tokens_BxL1, rng, masked_pred_prob, mask_id)
  logits_BxLxV = apply_fn(params, images, inputs_BxL, mask_Bx1xLxL)
  loss = objectives.token_cross_entropy(logits_BxLxV, targets_BxL, pad_id, normalization)
  return loss, {"parallel_fraction": jnp.mean(parallel_B.astype(jnp.float32))}


def captioning_logits(apply_fn, params, images, tokens_BxL1):
  """Teacher-forced causal logits for the targets `tokens_BxL1[:, 1:]`."""
  inputs_BxL, _ = objectives.split_inputs_targets(tokens_BxL1)
  mask = objectives.causal_mask(inputs_BxL.shape[1])[None, None]
  return apply_fn(params, images, inputs_BxL, mask)


def captioning_loss(apply_fn, params, images, tokens_BxL1, *, pad_id: int,
                    normalization: str = "per_example"):
  """Teacher-forced causal loss only (what validation reports, as in seed 003)."""
  logits_BxLxV = captioning_logits(apply_fn, params, images, tokens_BxL1)
  return objectives.token_cross_entropy(logits_BxLxV, tokens_BxL1[:, 1:], pad_id, normalization)


def encoder_macs(model_config, image_size: int) -> float:
  """Multiply-adds of the vision tower's forward pass, one image (patch embedding included)."""
  m = model_config
  d, n = m.width, (image_size // m.patch_size) ** 2
  t = n + m.num_registers
  return n * (m.patch_size**2 * 3) * d + m.enc_depth * (
      4 * t * d * d + 2 * t * t * d + 3 * t * d * m.mlp_dim)


def forward_flops_per_example(model_config, image_size: int) -> float:
  m = model_config
  d, dd = m.width, (m.dec_width or m.width)
  dmlp = m.dec_mlp_dim or m.mlp_dim
  t = (image_size // m.patch_size) ** 2 + m.num_registers
  length = m.max_len
  macs = encoder_macs(m, image_size)
  macs += m.dec_depth * (4 * length * dd * dd + 2 * length * length * dd
                         + 2 * length * dd * dd + 2 * t * d * dd + 2 * length * t * dd
                         + 3 * length * dd * dmlp)
  macs += length * dd * m.vocab_size
  return 2.0 * macs


@tasks.register("cappa")
class CapPa(base.Task):
  """Batches: {"image": uint8[B, S, S, 3], "tokens": int32[B, max_len + 1]} (BOS .. EOS PAD)."""

  @classmethod
  def check_config(cls, config):
    m = config.model
    for key in ("vocab_size", "patch_size", "width", "enc_depth", "dec_depth", "mlp_dim",
                "num_heads", "scan_unroll"):
      config_lib.check_range(f"model.{key}", m[key], 1)
    config_lib.check_range("model.max_len", m.max_len, 2)
    config_lib.check_range("model.num_registers", m.num_registers, 0)
    config_lib.check_range("objective.masked_pred_prob", config.objective.masked_pred_prob, 0, 1)
    if m.head_init not in ("zeros", "fan_in"):
      raise config_lib.ConfigError(
          f"model.head_init={m.head_init!r}; expected 'zeros' or 'fan_in'.")
    try:
      layers.check_matmul_policy(m.matmul_policy)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    if config.objective.loss_normalization not in objectives.LOSS_NORMALIZATIONS:
      raise config_lib.ConfigError(
          f"objective.loss_normalization={config.objective.loss_normalization!r}; expected one "
          f"of {objectives.LOSS_NORMALIZATIONS}.")
    if config.data.image_size % m.patch_size:
      raise config_lib.ConfigError(
          f"data.image_size={config.data.image_size} is not divisible by "
          f"model.patch_size={m.patch_size}.")
    for width_key in ("width", "dec_width"):
      if m[width_key] and m[width_key] % m.num_heads:
        raise config_lib.ConfigError(f"model.{width_key}={m[width_key]} is not divisible by "
                                     f"model.num_heads={m.num_heads}.")

  def build_model(self):
    return cappa_model.from_config(self.config)

  def batch_spec(self, batch_size):
    return base.caption_batch_spec(self.config, batch_size)

  def init_inputs(self):
    s, length = self.config.data.image_size, self.config.model.max_len
    return (jnp.zeros((1, s, s, 3), self.dtype), jnp.zeros((1, length), jnp.int32),
            objectives.causal_mask(length)[None, None])

  def _apply(self, params, *args):
    return self.model.apply({"params": params}, *args)

  def train_loss(self, params, batch, rng):
    return cappa_loss(
        self._apply, params, base.normalize_images(batch["image"], self.dtype), batch["tokens"],
        rng, masked_pred_prob=self.config.objective.masked_pred_prob,
        mask_id=self.special.mask, pad_id=self.special.pad,
        normalization=self.config.objective.loss_normalization)

  def eval_loss(self, params, batch):
    return captioning_loss(self._apply, params, base.normalize_images(batch["image"], self.dtype),
                           batch["tokens"], pad_id=self.special.pad,
                           normalization=self.config.objective.loss_normalization)

  def flops_per_example(self):
    return 3.0 * forward_flops_per_example(self.config.model, self.config.data.image_size)

  def predict_fns(self):
    return {"encode_images": self.encode_images, "score_captions": self.score_captions,
            "generate": self.generate}

  @functools.partial(jax.jit, static_argnums=0)
  def encode_images(self, params, images_uint8):
    """float32[B, patches + registers, D]: the vision tower's output tokens."""
    images = base.normalize_images(images_uint8, self.dtype)
    return self.model.apply({"params": params}, images, method="encode").astype(jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def score_captions(self, params, images_uint8, tokens_BxL1):
    """float32[B]: summed log-likelihood of each caption's tokens after BOS (EOS included,
    padding not), teacher-forced; big_vision's CapPa scoring does not length-normalise."""
    images = base.normalize_images(images_uint8, self.dtype)
    logits_BxLxV = captioning_logits(self._apply, params, images, tokens_BxL1)
    targets_BxL = tokens_BxL1[:, 1:]
    logp_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32)),
                                   targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets_BxL != self.special.pad, logp_BxL, 0.0), axis=-1)

  def generate(self, params, images_uint8):
    """int32[B, max_len]: greedy tokens after BOS, EOS-terminated, padded (KV-cached)."""
    images = base.normalize_images(images_uint8, self.dtype)
    return decode.greedy(self.model, params, images, special=self.special,
                         max_new_tokens=self.config.model.max_len).tokens[:, 0]
