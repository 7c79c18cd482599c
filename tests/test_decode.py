"""capjax.decode on a tiny float32 CapPa with a random vocabulary head: the KV cache against
recomputation, greedy against beam 1 and top-k 1 sampling, seeds, EOS handling, parallel
decoding and caption scores."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import decode, objectives
from capjax.tasks import base
from tests import helpers



@pytest.fixture(scope="module")
def tiny():
  """(model, params, images, special, max_len): float32, random vocabulary head."""
  config = helpers.tiny_config()
  task = helpers.task(config)
  params = jax.jit(lambda: helpers.random_head(nn.meta.unbox(task.init_params(
      jax.random.key(0)))))()
  rng = np.random.default_rng(0)
  s = config.data.image_size
  images = base.normalize_images(rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8),
                                 jnp.float32)
  return task.model, params, images, task.special, config.model.max_len


def with_eos_bias(params, special, bias: float):
  """params whose vocabulary bias favours EOS by `bias` (the head decides when rows end)."""
  decoder = dict(params["decoder"])
  decoder["logits_bias"] = decoder["logits_bias"].at[special.eos].add(bias)
  return {**params, "decoder": decoder}


@functools.partial(jax.jit, static_argnames=("model", "special"))
def teacher_forced_logits(model, params, images, tokens_BxL, special):
  """The full (uncached) forward pass on BOS + tokens[:-1], causally masked."""
  b, length = tokens_BxL.shape
  inputs = jnp.concatenate([jnp.full((b, 1), special.bos, jnp.int32), tokens_BxL[:, :-1]], 1)
  return model.apply({"params": params}, images, inputs,
                     objectives.causal_mask(length)[None, None])


def first_eos(row, eos):
  hits = np.flatnonzero(row == eos)
  return int(hits[0]) if hits.size else None


def test_cached_greedy_gives_the_tokens_and_logits_of_recomputing_the_prefix(tiny):
  model, params, images, special, max_len = tiny
  cached = decode.greedy(model, params, images, special=special, max_new_tokens=max_len,
                         min_new_tokens=max_len, return_logits=True)
  recomputed = decode.greedy(model, params, images, special=special, max_new_tokens=max_len,
                             min_new_tokens=max_len, return_logits=True, cached=False)
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.logits, recomputed.logits, atol=1e-5, rtol=0)
  # And both are the full model's teacher-forced logits on the tokens generated.
  full = teacher_forced_logits(model, params, images, cached.tokens[:, 0], special)
  np.testing.assert_allclose(cached.logits[:, 0], full, atol=1e-5, rtol=0)
  no_eos = np.asarray(full).copy()
  no_eos[..., special.eos] = -np.inf  # min_new_tokens = max_len: EOS never chosen
  np.testing.assert_array_equal(cached.tokens[:, 0], np.argmax(no_eos, -1))
  assert len(np.unique(np.asarray(cached.tokens))) > 3  # not a constant output


def test_the_cache_takes_a_prompt_of_several_tokens_then_one_at_a_time(tiny):
  model, params, images, special, max_len = tiny
  tokens = jax.random.randint(jax.random.key(3), (images.shape[0], max_len), 5, 60)

  @jax.jit
  def run(params, images, tokens):
    enc = decode.encode(model, params, images)
    state = decode.steps.CachedSteps(model, params, max_len).init(enc)
    apply = lambda cache, chunk: model.apply(
        {"params": params, "cache": cache}, chunk, state["enc"], None, decode=True,
        method="decode", mutable=["cache"])
    logits_prompt, variables = apply(state["cache"], tokens[:, :5])
    logits_next, _ = apply(variables["cache"], tokens[:, 5:6])
    full = model.apply({"params": params}, tokens, enc,
                       objectives.causal_mask(max_len)[None, None], method="decode")
    return logits_prompt, logits_next, full

  logits_prompt, logits_next, full = run(params, images, tokens)
  np.testing.assert_allclose(logits_prompt, full[:, :5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits_next[:, 0], full[:, 5], atol=1e-5, rtol=0)


def test_rows_stop_at_their_own_eos_and_the_loop_at_the_last(tiny):
  model, params, images, special, max_len = tiny
  # An EOS bias at which the rows end at different steps (the random head decides where).
  for bias in np.arange(0.0, 12.0, 0.5):
    biased = with_eos_bias(params, special, float(bias))
    out = decode.greedy(model, biased, images, special=special, max_new_tokens=max_len,
                        return_logits=True)
    ends = [first_eos(row, special.eos) for row in np.asarray(out.tokens[:, 0])]
    if None not in ends and len(set(ends)) > 1:
      break
  else:
    pytest.fail("no EOS bias made the rows end at different steps")
  tokens, logits = np.asarray(out.tokens[:, 0]), np.asarray(out.logits[:, 0])
  logprobs = np.asarray(out.token_logprobs[:, 0])
  full = np.asarray(teacher_forced_logits(model, biased, images, out.tokens[:, 0], special))
  for row, end, row_full, row_logp in zip(tokens, ends, full, logprobs):
    np.testing.assert_array_equal(row[:end + 1], np.argmax(row_full[:end + 1], -1))
    assert np.all(row[end + 1:] == special.pad)  # nothing generated after its EOS
    assert np.all(row_logp[end + 1:] == 0)
  np.testing.assert_allclose(out.scores[:, 0], logprobs.sum(-1), rtol=1e-6)
  # The loop ran until the last row ended, not to max_len: later steps never ran.
  assert max(ends) < max_len - 1
  assert np.all(logits[:, max(ends) + 1:] == 0) and np.all(logits[:, :max(ends) + 1] != 0)


def test_min_new_tokens_suppresses_eos(tiny):
  model, params, images, special, max_len = tiny
  eager = with_eos_bias(params, special, 1e4)  # EOS at once, unless suppressed
  out = decode.greedy(model, eager, images, special=special, max_new_tokens=max_len)
  assert np.all(np.asarray(out.tokens)[:, 0, 0] == special.eos)
  for fn in (
      lambda: decode.greedy(model, eager, images, special=special, max_new_tokens=max_len,
                            min_new_tokens=5),
      lambda: decode.sample(model, eager, images, jax.random.key(0), special=special,
                            max_new_tokens=max_len, min_new_tokens=5, num_samples=2),
      lambda: decode.beam_search(model, eager, images, special=special, max_new_tokens=max_len,
                                 min_new_tokens=5, beam_size=2, num_return=2)):
    tokens = np.asarray(fn().tokens)
    assert not np.any(tokens[..., :5] == special.eos)
    assert np.all(tokens[..., 5] == special.eos)


def test_beam_size_1_is_greedy(tiny):
  model, params, images, special, max_len = tiny
  for bias in (0.0, 3.0, 4.0):  # rows that end, and rows that run to max_len
    biased = with_eos_bias(params, special, bias)
    greedy = decode.greedy(model, biased, images, special=special, max_new_tokens=max_len)
    beam = decode.beam_search(model, biased, images, special=special, max_new_tokens=max_len,
                              beam_size=1, length_penalty_alpha=0.0)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)


def test_beam_search_returns_n_best_sorted_and_eos_terminated(tiny):
  model, params, images, special, max_len = tiny
  biased = with_eos_bias(params, special, 4.0)
  out = decode.beam_search(model, biased, images, special=special, max_new_tokens=max_len,
                           beam_size=4, num_return=3, length_penalty_alpha=0.6)
  tokens, scores = np.asarray(out.tokens), np.asarray(out.scores)
  assert tokens.shape == (images.shape[0], 3, max_len) and scores.shape == (images.shape[0], 3)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first
  for image_tokens, image_scores, image_logp in zip(tokens, scores, np.asarray(out.token_logprobs)):
    assert len({tuple(t) for t in image_tokens}) == 3  # three different hypotheses
    for row, score, logp in zip(image_tokens, image_scores, image_logp):
      end = first_eos(row, special.eos)
      assert end is not None and np.all(row[end + 1:] == special.pad)
      # The score is the hypothesis' log-likelihood over GNMT's length penalty.
      np.testing.assert_allclose(score, logp.sum() / decode.length_penalty(end + 1, 0.6),
                                 rtol=1e-5)
  # The log-likelihoods are the model's: teacher-forced scores of the same tokens agree.
  flat = tokens.reshape(-1, max_len)
  full = teacher_forced_logits(model, biased, jnp.repeat(images, 3, axis=0), flat, special)
  logp = jnp.take_along_axis(jax.nn.log_softmax(full), flat[..., None], -1)[..., 0]
  logp = np.where(np.asarray(out.token_logprobs).reshape(-1, max_len) != 0, logp, 0)
  np.testing.assert_allclose(logp, np.asarray(out.token_logprobs).reshape(-1, max_len),
                             atol=1e-5)


def test_top_k_1_sampling_is_greedy(tiny):
  model, params, images, special, max_len = tiny
  biased = with_eos_bias(params, special, 3.0)
  greedy = decode.greedy(model, biased, images, special=special, max_new_tokens=max_len)
  sampled = decode.sample(model, biased, images, jax.random.key(7), special=special,
                          max_new_tokens=max_len, num_samples=3, top_k=1, temperature=2.0)
  np.testing.assert_array_equal(sampled.tokens, np.repeat(np.asarray(greedy.tokens), 3, 1))


def test_the_same_seed_gives_the_same_samples_and_other_seeds_others(tiny):
  model, params, images, special, max_len = tiny
  draw = lambda seed: np.asarray(decode.sample(
      model, params, images, jax.random.key(seed), special=special, max_new_tokens=max_len,
      num_samples=4, top_p=0.9).tokens)
  first = draw(1)
  np.testing.assert_array_equal(first, draw(1))
  assert not np.array_equal(first, draw(2))
  assert len({tuple(t) for t in first[0]}) > 1  # the samples of one image differ


def test_nucleus_keeps_the_likeliest_tokens_that_reach_top_p():
  rng = np.random.default_rng(0)
  nucleus = jax.jit(lambda logits, top_p: decode.filter_logits(logits, 1.0, 0, top_p))
  for trial in range(30):
    vocab, top_p = (2, 7, 64)[trial % 3], float(rng.uniform(0.05, 1.0))
    logits = rng.normal(size=(8, vocab)) * rng.uniform(0.2, 5.0)
    kept = np.isfinite(np.asarray(nucleus(jnp.asarray(logits, jnp.float32), top_p)))
    for row, row_kept in zip(logits, kept):
      probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      order = np.argsort(-probs)
      n = min(int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1, vocab)
      np.testing.assert_array_equal(np.sort(np.flatnonzero(row_kept)), np.sort(order[:n]))
  logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0]])
  assert np.isfinite(np.asarray(decode.filter_logits(logits, 1.0, 2, 1.0))).sum() == 2
  assert np.isfinite(np.asarray(decode.filter_logits(logits, 1.0, 0, 1e-3))).sum() == 1


def test_parallel_decoding_shapes_and_refinement_changes_only_masked_positions(tiny):
  model, params, images, special, max_len = tiny
  biased = with_eos_bias(params, special, 2.0)
  one_pass = decode.parallel(model, biased, images, special=special, length=max_len)
  tokens = np.asarray(one_pass.tokens)
  assert tokens.shape == (images.shape[0], 1, max_len) and tokens.dtype == np.int32
  for row in tokens[:, 0]:
    end = first_eos(row, special.eos)
    if end is not None:
      assert np.all(row[end + 1:] == special.pad)
  masked = np.asarray(decode.remask(one_pass.tokens[:, 0], one_pass.token_logprobs[:, 0], 0.5,
                                    special.eos))
  assert masked.sum() > 0
  refined = decode.parallel(model, biased, images, special=special, length=max_len,
                            refine_steps=1)
  changed = np.asarray(refined.tokens[:, 0]) != tokens[:, 0]
  assert not np.any(changed & ~masked)  # only re-masked words change
  assert np.any(changed)
  short = decode.parallel(model, biased, images, special=special, length=max_len,
                          max_new_tokens=5)
  np.testing.assert_array_equal(short.tokens, tokens[..., :5])


def test_remask_picks_the_least_confident_words_before_eos():
  tokens = jnp.asarray([[10, 11, 12, 13, 2, 0], [10, 11, 12, 13, 14, 15]])
  confidence = jnp.asarray([[-0.1, -3.0, -0.2, -2.0, -9.0, -9.0],
                            [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])
  masked = np.asarray(decode.remask(tokens, confidence, 0.5, eos=2))
  np.testing.assert_array_equal(masked, [[False, True, False, True, False, False],
                                         [False, False, False, True, True, True]])


def test_log_likelihood_is_the_tasks_caption_score(tiny):
  model, params, images, special, max_len = tiny
  config = helpers.tiny_config()
  task = helpers.task(config)
  rng = np.random.default_rng(1)
  tokens = rng.integers(5, 60, (images.shape[0], 3, max_len + 1)).astype(np.int32)
  tokens[..., 0] = special.bos
  for n, row in enumerate(tokens.reshape(-1, max_len + 1)):
    end = 3 + n % 7
    row[end], row[end + 1:] = special.eos, special.pad
  enc = decode.encode(model, params, images)
  scores = np.asarray(decode.log_likelihood(model, params, enc, jnp.asarray(tokens),
                                            special=special))
  images_uint8 = np.asarray(jnp.round((images + 1) * 127.5)).astype(np.uint8)
  for i in range(3):
    expected = task.score_captions(params, images_uint8, jnp.asarray(tokens[:, i]))
    np.testing.assert_allclose(scores[:, i], expected, rtol=1e-5, atol=1e-4)


def test_categorical_draws_tokens_with_their_softmax_probabilities():
  logits = jnp.asarray([[0.0, 1.0, -jnp.inf, 2.0, -1.0]] * 8)
  draw = jax.jit(jax.vmap(lambda key: decode.sampling.categorical(key, logits)))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 5000))).ravel(),
                       minlength=5)
  probs = np.asarray(jax.nn.softmax(logits[0]))
  assert counts[2] == 0  # a filtered token is never drawn
  np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.01)  # 40000 draws
