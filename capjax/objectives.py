"""Pieces of caption objectives shared by the tasks: teacher forcing and the token loss.

Each family's own objective (CapPa's parallel prediction, a prefix LM's masked image
positions, SigLiT's sigmoid loss) lives in its task file under `capjax/tasks/`.
"""

import jax.numpy as jnp
import optax


def split_inputs_targets(tokens_BxL1):
  """[BOS w1 .. wn EOS PAD..] -> inputs (drop last), targets (drop first)."""
  return tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]


def causal_mask(length: int):
  return jnp.tril(jnp.ones((length, length), dtype=bool))


LOSS_NORMALIZATIONS = ("per_example", "per_token")


def token_cross_entropy(logits_BxLxV, targets_BxL, pad_id: int,
                        normalization: str = "per_example"):
  """Cross-entropy over non-padding target tokens, in float32 (`weighted_cross_entropy` with
  weight 1 where the target is not PAD)."""
  return weighted_cross_entropy(logits_BxLxV, targets_BxL,
                                (targets_BxL != pad_id).astype(jnp.float32), normalization)


def caption_weights(targets_BxL, eos_id: int, pad_id: int):
  """float32[B, L]: 1 at a caption's targets through its first EOS, PAD excluded where PAD is
  not EOS (a row without EOS, as zero-shot prompt beginnings, counts its words only)."""
  weights_BxL = through_first_eos(targets_BxL, eos_id)
  return weights_BxL * (targets_BxL != pad_id) if pad_id != eos_id else weights_BxL


def through_first_eos(targets_BxL, eos_id: int):
  """float32[B, L]: 1 at each row's tokens up to and including its first EOS, 0 after: the
  caption's tokens whatever follows them (also where PAD is EOS, as for GPT-2's vocabulary)."""
  is_eos_BxL = targets_BxL == eos_id
  return ((jnp.cumsum(is_eos_BxL, axis=1) - is_eos_BxL) == 0).astype(jnp.float32)


def weighted_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL,
                           normalization: str = "per_example"):
  """Cross-entropy of the targets with weight 1 (0: not counted), in float32.

  per_example (`objective.loss_normalization`'s default): the mean over captions of each
  caption's mean token loss, as big_vision (`utils.weighted_softmax_xent(normalize=True)`) and
  clip-jax do, so a long caption weighs as much as a short one; a row with no tokens adds
  nothing and is not counted. per_token: the mean over all tokens of the batch.
  """
  if normalization not in LOSS_NORMALIZATIONS:
    raise ValueError(f"objective.loss_normalization={normalization!r}; expected one of "
                     f"{LOSS_NORMALIZATIONS}.")
  weights_BxL = weights_BxL.astype(jnp.float32)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL) * weights_BxL
  if normalization == "per_token":
    return jnp.sum(losses_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)
  tokens_B = jnp.sum(weights_BxL, axis=1)
  losses_B = jnp.sum(losses_BxL, axis=1) / jnp.maximum(tokens_B, 1.0)
  return jnp.sum(losses_B) / jnp.maximum(jnp.sum(tokens_B > 0), 1)
