"""CapPa objective: per example, autoregressive captioning or parallel prediction.

With probability `masked_pred_prob` an example's decoder input is replaced entirely
by MASK tokens and its self-attention is bidirectional (parallel prediction);
otherwise it is teacher-forced causal captioning. Both use the same token
cross-entropy on the caption (padding excluded), normalized per example by default: each
caption's token losses are averaged, then the captions, as big_vision
(`utils.weighted_softmax_xent(normalize=True)`) and clip-jax do, so a long caption weighs
as much as a short one. "per_token" averages over all tokens of the batch.
"""

import jax
import jax.numpy as jnp
import optax


def split_inputs_targets(tokens_BxL1):
  """[BOS w1 .. wn EOS PAD..] -> inputs (drop last), targets (drop first)."""
  return tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]


def parallel_prediction_rows(rng, batch_size: int, masked_pred_prob: float):
  """bool[B]: True for the examples trained by parallel prediction this step."""
  return jax.random.uniform(rng, (batch_size,)) < masked_pred_prob


def causal_mask(length: int):
  return jnp.tril(jnp.ones((length, length), dtype=bool))


def self_attention_mask(parallel_B, length: int):
  """bool[B, 1, L, L]: causal for captioning rows, all-True for parallel rows."""
  causal_LxL = causal_mask(length)
  return (causal_LxL[None] | parallel_B[:, None, None])[:, None]


def mask_inputs(inputs_BxL, parallel_B, mask_id: int):
  return jnp.where(parallel_B[:, None], jnp.asarray(mask_id, inputs_BxL.dtype), inputs_BxL)


LOSS_NORMALIZATIONS = ("per_example", "per_token")


def token_cross_entropy(logits_BxLxV, targets_BxL, pad_id: int,
                        normalization: str = "per_example"):
  """Cross-entropy over non-padding target tokens, in float32.

  per_example: the mean over captions of each caption's mean token loss; a row with no
  tokens adds nothing and is not counted. per_token: the mean over all tokens of the batch.
  """
  if normalization not in LOSS_NORMALIZATIONS:
    raise ValueError(f"objective.loss_normalization={normalization!r}; expected one of "
                     f"{LOSS_NORMALIZATIONS}.")
  weights_BxL = (targets_BxL != pad_id).astype(jnp.float32)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL) * weights_BxL
  if normalization == "per_token":
    return jnp.sum(losses_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)
  tokens_B = jnp.sum(weights_BxL, axis=1)
  losses_B = jnp.sum(losses_BxL, axis=1) / jnp.maximum(tokens_B, 1.0)
  return jnp.sum(losses_B) / jnp.maximum(jnp.sum(tokens_B > 0), 1)


def cappa_inputs(tokens_BxL1, rng, masked_pred_prob: float, mask_id: int):
  """Returns (decoder inputs, targets, self-attention mask, parallel rows)."""
  inputs_BxL, targets_BxL = split_inputs_targets(tokens_BxL1)
  parallel_B = parallel_prediction_rows(rng, inputs_BxL.shape[0], masked_pred_prob)
  inputs_BxL = mask_inputs(inputs_BxL, parallel_B, mask_id)
  return inputs_BxL, targets_BxL, self_attention_mask(parallel_B, inputs_BxL.shape[1]), parallel_B


def cappa_loss(apply_fn, params, images, tokens_BxL1, rng, *, masked_pred_prob: float,
               mask_id: int, pad_id: int, normalization: str = "per_example"):
  inputs_BxL, targets_BxL, mask_Bx1xLxL, parallel_B = cappa_inputs(
      tokens_BxL1, rng, masked_pred_prob, mask_id)
  logits_BxLxV = apply_fn(params, images, inputs_BxL, mask_Bx1xLxL)
  loss = token_cross_entropy(logits_BxLxV, targets_BxL, pad_id, normalization)
  return loss, {"parallel_fraction": jnp.mean(parallel_B.astype(jnp.float32))}


def captioning_loss(apply_fn, params, images, tokens_BxL1, *, pad_id: int,
                    normalization: str = "per_example"):
  """Teacher-forced causal loss only (what validation reports, as in seed 003)."""
  inputs_BxL, targets_BxL = split_inputs_targets(tokens_BxL1)
  mask = causal_mask(inputs_BxL.shape[1])[None, None]
  logits_BxLxV = apply_fn(params, images, inputs_BxL, mask)
  return token_cross_entropy(logits_BxLxV, targets_BxL, pad_id, normalization)
