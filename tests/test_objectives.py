"""capjax.objectives: the token cross-entropy's normalization on a ragged batch."""

import jax.numpy as jnp
import numpy as np
import pytest

from capjax import objectives

PAD, V, L = 0, 4, 32


def _ragged_batch():
  """Captions of 3 and 30 tokens and an empty row. Every logit is 0 except the target's:
  0 in the short caption (token loss ln 4 = 1.386294), 2 in the long one
  (token loss ln(e^2 + 3) - 2 = 0.340753)."""
  targets_BxL = np.zeros((3, L), np.int32)
  targets_BxL[0, :3] = [1, 2, 3]
  targets_BxL[1, :30] = np.arange(30) % 3 + 1
  target_logit_B = np.array([0.0, 2.0, 5.0], np.float32)
  onehot_BxLxV = np.eye(V, dtype=np.float32)[targets_BxL]
  logits_BxLxV = onehot_BxLxV * target_logit_B[:, None, None]
  return jnp.asarray(logits_BxLxV), jnp.asarray(targets_BxL)


def test_per_example_averages_each_caption_then_the_captions():
  logits, targets = _ragged_batch()
  loss = objectives.token_cross_entropy(logits, targets, PAD, "per_example")
  # (1.386294 + 0.340753) / 2: the empty row adds nothing and is not counted.
  np.testing.assert_allclose(float(loss), 0.863524, atol=1e-6)
  assert objectives.token_cross_entropy(logits, targets, PAD) == loss  # the default


def test_per_token_averages_all_tokens_of_the_batch():
  logits, targets = _ragged_batch()
  loss = objectives.token_cross_entropy(logits, targets, PAD, "per_token")
  # (3 * 1.386294 + 30 * 0.340753) / 33: the long caption dominates.
  np.testing.assert_allclose(float(loss), 0.435802, atol=1e-6)


def test_all_padding_is_zero_not_nan():
  logits, targets = _ragged_batch()
  for normalization in objectives.LOSS_NORMALIZATIONS:
    loss = objectives.token_cross_entropy(logits, jnp.zeros_like(targets), PAD, normalization)
    assert float(loss) == 0.0


def test_unknown_normalization_names_the_key():
  logits, targets = _ragged_batch()
  with pytest.raises(ValueError, match="objective.loss_normalization"):
    objectives.token_cross_entropy(logits, targets, PAD, "per_batch")
