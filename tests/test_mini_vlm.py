"""Mini-VLM (task=mini_vlm): the patch projector over every tower token, image positions out of
the loss, a frozen tower (and a frozen LM), EOS taught and used, the KV-cached greedy after a
long prefix (RoPE positions) equal to recomputing, and a converted ViT + Llama (grouped-query
attention) through init.vision / init.lm."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from capjax import decode, objectives, setup as setup_lib, tasks
from capjax.data import tokenizer as tokenizer_lib
from capjax.models import hf, prefix
from capjax.tasks import prefix_lm
from tests import helpers

BOS, EOS = 1, 2  # tokenizer.SENTENCEPIECE_IDS
TOKENS = (32 // 8) ** 2 + 1  # the tiny tower's: 16 patches and the class token


@pytest.fixture(scope="module")
def tiny():
  """(config, task, params, batch) of a tiny random mini_vlm model."""
  config = helpers.prefix_config("mini_vlm_small")
  task = tasks.get(config, tokenizer_lib.SENTENCEPIECE_IDS)
  params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(0)))
  return config, task, params, helpers.caption_batch(config, [[BOS, 5, 6, EOS], [BOS, 7, EOS]])


def test_the_projector_maps_every_tower_token(tiny):
  config, task, params, batch = tiny
  assert task.prefix_len(config) == TOKENS
  features = task.encode_images(params, batch["image"])
  assert features.shape == (2, TOKENS, 32)
  mapped = jax.jit(lambda f: task.model.apply({"params": params}, f, method="prefix"))(features)
  assert mapped.shape == (2, TOKENS, 32)
  p = params["mapper"]
  assert (p["hidden"]["kernel"].shape, p["norm"]["scale"].shape, p["out"]["kernel"].shape) == (
      (32, 32), (32,), (32, 32))
  # Per token: one image's tokens in another order come out in that order.
  order = np.random.default_rng(0).permutation(TOKENS)
  projector = prefix.PatchProjector(32)
  apply = jax.jit(lambda f: projector.apply({"params": p}, f))
  np.testing.assert_allclose(apply(features[:, order]), apply(features)[:, order], atol=1e-5)


def test_image_positions_are_out_of_the_loss(tiny):
  config, task, params, batch = tiny
  inputs, targets, weights = prefix_lm.prefix_targets(batch["tokens"], TOKENS, EOS)
  assert not weights[:, :TOKENS].any() and weights.sum() == 3 + 2
  logits = jax.jit(lambda t, x: task.model.apply({"params": params}, t, pixels=task.pixels(x)))(
      inputs, batch["image"])
  assert logits.shape == (2, TOKENS + config.model.max_len, config.model.vocab_size)
  loss = lambda t: objectives.weighted_cross_entropy(logits, t, weights)
  np.testing.assert_allclose(loss(targets), jax.jit(task.eval_loss)(params, batch), rtol=1e-6)
  for position in (0, TOKENS // 2, TOKENS - 1):
    assert loss(targets.at[:, position].set(11)) == loss(targets)
  assert loss(targets.at[1, TOKENS].set(11)) != loss(targets)


@pytest.mark.slow
def test_a_frozen_lm_and_the_tower_stay_bitwise_unchanged_without_optimizer_state():
  config = helpers.prefix_config("mini_vlm_small", **{"model.lm.frozen": True})
  batch = helpers.caption_batch(config, [[BOS, 5, 6, EOS], [BOS, 7, 8, 9, EOS]] * 4)
  before, after = helpers.train_steps(config, batch, 3)
  for part in ("vision", "lm"):
    assert helpers.bitwise_equal(after.params[part], before.params[part]), part
  assert not helpers.bitwise_equal(after.params["mapper"], before.params["mapper"])
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(after.opt_state)[0]]
  assert any("'mapper'" in p for p in paths)
  assert not any("'vision'" in p or "'lm'" in p for p in paths), paths


def test_cached_greedy_after_the_image_tokens_equals_recomputing(tiny):
  config, task, params, _ = tiny
  length = config.model.max_len
  images = helpers.caption_batch(config, [[BOS]] * 3, seed=4)["image"]
  cached = np.asarray(task.generate(params, images))
  tokens = np.full((3, length), BOS, np.int32)
  full = jax.jit(lambda t: task.model.apply({"params": params}, t, pixels=task.pixels(images)))
  for i in range(length):
    nxt = np.argmax(full(tokens)[:, TOKENS + i], -1)
    if i + 1 < length:
      tokens[:, i + 1] = nxt
    ended = (cached[:, :i] == EOS).any(1)
    np.testing.assert_array_equal(cached[:, i], np.where(ended, 0, nxt))


@pytest.mark.slow
def test_eos_is_taught_and_generation_stops_there():
  config = helpers.prefix_config("mini_vlm_small", **{"schedule.peak_lr": 1e-2,
                                                      "schedule.warmup_steps": 1})
  batch = helpers.caption_batch(config, [[BOS, 5, 6, EOS]] * 8)
  _, after = helpers.train_steps(config, batch, 40)
  out = np.asarray(tasks.get(config, tokenizer_lib.SENTENCEPIECE_IDS).generate(
      after.params, batch["image"][:2]))
  np.testing.assert_array_equal(out, [[5, 6, EOS] + [0] * 21] * 2)


def test_a_converted_vit_and_llama_load_through_init_vision_and_init_lm(tmp_path):
  torch = pytest.importorskip("torch", reason="needs the test-hf extra")
  t = pytest.importorskip("transformers", reason="needs the test-hf extra")
  from tools import convert_hf  # pylint: disable=g-import-not-at-top
  vocab, eot = helpers.bpe_directory(tmp_path / "llama_hf")
  torch.manual_seed(0)
  t.LlamaForCausalLM(t.LlamaConfig(
      vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot)
  ).save_pretrained(tmp_path / "llama_hf")
  t.ViTModel(t.ViTConfig(hidden_size=18, intermediate_size=30, num_hidden_layers=1,
                         num_attention_heads=3, image_size=32, patch_size=16),
             add_pooling_layer=False).save_pretrained(tmp_path / "vit_hf")
  for name in ("llama", "vit"):
    convert_hf.main([f"--src={tmp_path / (name + '_hf')}", f"--dst={tmp_path / name}"])
  config = helpers.prefix_config("mini_vlm_small", **{
      "init.vision": str(tmp_path / "vit"), "init.lm": str(tmp_path / "llama")})
  workdir = tmp_path / "run"
  run_config = tasks.prepare_run(config, str(workdir))
  v, lm = run_config.model.vision, run_config.model.lm
  assert (v.family, v.width, v.num_heads, v.patch_size, run_config.data.image_size) == (
      "vit", 18, 3, 16, 32)
  assert (lm.family, lm.width, lm.num_heads, lm.num_kv_heads, lm.head_dim) == (
      "llama", 24, 6, 2, 4)
  assert run_config.model.vocab_size == vocab and lm.tie_embeddings
  tok = tokenizer_lib.Tokenizer(str(workdir / "tokenizer.model"))
  assert tok.special.eos == eot
  run = setup_lib.assemble(run_config, tok.special)
  with run.context():
    params = jax.device_get(run.init_state().params)
  for part, name in (("vision", "vit"), ("lm", "llama")):
    assert helpers.bitwise_equal(params[part], hf.load(tmp_path / name)[1]["params"]), part
  assert params["mapper"]["hidden"]["kernel"].shape == (18, 24)  # tower width -> LM width
  task = tasks.get(run_config, tok.special)
  images = helpers.caption_batch(run_config, [[eot]] * 2)["image"]
  out = np.asarray(task.generate(params, images))
  assert out.shape == (2, run_config.model.max_len) and isinstance(tok.decode(out[0]), str)


@pytest.mark.slow
def test_the_decoders_run_the_prefix_decoder_as_they_run_cappas(tiny):
  """capjax.decode through the task's decoder: the KV cache equals recomputing, a beam of one
  and top-1 sampling are greedy, and the rows of an image are repeated and reordered alike."""
  config, task, params, _ = tiny
  images = task.pixels(helpers.caption_batch(config, [[BOS]] * 2, seed=5)["image"])
  decoder, special = task.decoder(), tokenizer_lib.SENTENCEPIECE_IDS
  common = dict(special=special, max_new_tokens=6)
  greedy = decode.greedy(decoder, params, images, **common)
  recomputed = decode.greedy(decoder, params, images, cached=False, **common)
  np.testing.assert_array_equal(greedy.tokens, recomputed.tokens)
  np.testing.assert_allclose(greedy.token_logprobs, recomputed.token_logprobs, atol=1e-4)
  beam = decode.beam_search(decoder, params, images, beam_size=1, **common)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  sampled = decode.sample(decoder, params, images, jax.random.key(1), num_samples=3, top_k=1,
                          **common)
  np.testing.assert_array_equal(sampled.tokens, np.repeat(greedy.tokens, 3, axis=1))
  beams = decode.beam_search(decoder, params, images, beam_size=3, num_return=3, **common)
  assert beams.tokens.shape == (2, 3, 6) and np.all(np.diff(beams.scores, axis=1) <= 0)
