"""clip-jax 0.0.6's CapPa at capjax's sizes, with an equivalent train step (the reference).

clip-jax's CapPa is `CLIPModel` with `text_config.is_decoder=True`: its text tower
masks whole captions with probability `masked_pred_prob` (and makes their
self-attention bidirectional) only when called with `deterministic=False` and a
"dropout" rng. Its caption loss lives in its repository's training script, so the
loss here is the same token cross-entropy capjax uses (float32, padding excluded).

Matched to capjax: patch size, width, depth, heads, GeGLU MLP width, registers
(kept for the decoder's cross-attention), learned positions, NormFormer RMSNorms
with scales, no biases except the vocabulary projection, decoder depth, vocabulary,
text length, batch, compute dtype, attention logits in float32, the optimizer
(capjax's own AdamW chain) and the MASK-token objective.
Install: `pip install -e '.[bench]'` (clip-jax==0.0.6, einshape, transformers<5).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from capjax import objectives
from capjax.tasks import base as tasks_base
from capjax.optim import factory

# capjax remat policy -> clip-jax's nearest (clip-jax has no "save every dot" policy).
REMAT = {"none": "none", "full": "full", "dots": "minimal", "dots_no_batch": "minimal"}


def _tower(m, width, depth, mlp_dim):
  return dict(hidden_size=width, num_layers=depth, num_heads=m.num_heads, mlp_dim=mlp_dim,
              use_rmsnorm=True, ln_type="normformer", activations=("gelu", "linear"),
              use_bias=False, force_scale=True, float32_logits=True,
              remat_policy=REMAT[m.remat_policy])


def make_model(config, mask_id: int, pad_id: int, bos_id: int, eos_id: int):
  from clip_jax import CLIPModel  # pylint: disable=g-import-not-at-top
  m, s = config.model, config.data.image_size
  grid = s // m.patch_size
  vision = dict(_tower(m, m.width, m.enc_depth, m.mlp_dim), image_size=s,
                patch_size=m.patch_size, use_causal_mask=False,
                position_embedding_type="learnt", position_embedding_shape=(grid, grid),
                pool_type=None, registers=m.num_registers, keep_registers=True)
  dec_width = m.get("dec_width") or m.width
  text = dict(_tower(m, dec_width, m.dec_depth, m.get("dec_mlp_dim") or m.mlp_dim),
              vocab_size=m.vocab_size, max_length=m.max_len, position_embedding_type="learnt",
              use_causal_mask=True, is_decoder=True,
              masked_pred_prob=config.objective.masked_pred_prob, mask_token_id=mask_id,
              pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
  return CLIPModel(text_config=text, vision_config=vision, projection_dim=m.width,
                   dtype=config.dtype)


class ClipjaxStep:
  """Same interface as bench/steps.CapjaxStep: init(batch), run() -> metrics."""

  def __init__(self, config, mask_id: int, pad_id: int, bos_id: int, eos_id: int):
    self.config = config
    self.model = make_model(config, mask_id, pad_id, bos_id, eos_id)
    self.optimizer = factory.make_optimizer(config)
    self.pad_id = pad_id
    self.step_fn = jax.jit(self._train_step, donate_argnums=0)

  def _inputs(self, batch_size: int):
    s, length = self.config.data.image_size, self.config.model.max_len
    return (jnp.zeros((batch_size, length), jnp.int32),
            jnp.zeros((batch_size, s, s, 3), jnp.dtype(self.config.dtype)),
            jnp.ones((batch_size, length), jnp.int32))

  def _loss(self, params, images, tokens, rng):
    inputs_BxL, targets_BxL = objectives.split_inputs_targets(tokens)
    out = self.model.apply({"params": params}, input_ids=inputs_BxL, pixel_values=images,
                           attention_mask=jnp.ones_like(inputs_BxL), deterministic=False,
                           rngs={"dropout": rng})
    logits_BxLxV = out["text_model_output"]["last_hidden_state"]
    return objectives.token_cross_entropy(logits_BxLxV, targets_BxL, self.pad_id)

  def _train_step(self, state, batch):
    params, opt_state, step = state
    rng = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
    images = tasks_base.normalize_images(batch["image"], jnp.dtype(self.config.dtype))
    loss, grads = jax.value_and_grad(self._loss)(params, images, batch["tokens"], rng)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads)}
    return (params, opt_state, step + 1), metrics

  def init(self, batch: dict):
    rngs = {"params": jax.random.key(self.config.seed), "dropout": jax.random.key(1)}
    params = nn.meta.unbox(jax.jit(
        lambda: self.model.init(rngs, *self._inputs(1), deterministic=True))()["params"])
    self.state = (params, jax.jit(self.optimizer.init)(params), jnp.zeros((), jnp.int32))
    self.batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def run(self):
    self.state, metrics = self.step_fn(self.state, self.batch)
    return metrics

  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.state[0]))
