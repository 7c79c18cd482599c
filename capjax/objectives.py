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


def token_cross_entropy(logits_BxLxV, targets_BxL, pad_id: int):
  """Mean cross-entropy over non-padding target tokens, in float32."""
  weights_BxL = (targets_BxL != pad_id).astype(jnp.float32)
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)
  return jnp.sum(losses_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)
