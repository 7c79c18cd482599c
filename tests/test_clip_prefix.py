"""ClipCap (task=clip_prefix): the mappers, L2-normalised embeddings, noise only in training,
the loss only on caption tokens, a frozen tower, EOS taught and used, the KV-cached greedy equal
to recomputing, Hugging Face tokenizers, and a converted CLIP + GPT-2 through init.vision /
init.lm."""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import caption, captioner as captioner_lib, config as config_lib, evaluate
from capjax import objectives, setup as setup_lib, tasks, train, trained as trained_lib
from capjax.data import pipeline, tokenizer as tokenizer_lib
from capjax.models import hf, prefix
from capjax.tasks import prefix_lm
from tests import helpers

BOS, EOS = 1, 2  # tokenizer.SENTENCEPIECE_IDS


def init(config, special=tokenizer_lib.SENTENCEPIECE_IDS):
  task = tasks.get(config, special)
  return task, nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(0)))


@pytest.fixture(scope="module")
def tiny():
  """(config, task, params, batch) of a tiny random clip_prefix model."""
  config = helpers.prefix_config("clip_prefix_small")
  task, params = init(config)
  return config, task, params, helpers.caption_batch(config, [[BOS, 5, 6, EOS], [BOS, 7, EOS]])


# --------------------------------------------------------------------------------- mappers


@pytest.mark.parametrize("prefix_len,depth", [(3, 1), (5, 2)])
def test_transformer_mapper_reads_learned_constant_tokens(prefix_len, depth):
  mapper = prefix.TransformerMapper(prefix_len, width=16, clip_len=4, depth=depth, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, 24))
  variables = jax.jit(mapper.init)(jax.random.key(1), x)
  out = jax.jit(mapper.apply)(variables, x)
  params = nn.meta.unbox(variables["params"])
  assert out.shape == (3, prefix_len, 16)
  assert params["prefix_const"].shape == (prefix_len, 16)
  assert params["input"]["kernel"].shape == (24, 4 * 16)
  assert params["layers"]["mlp"]["wi"]["kernel"].shape == (depth, 16, 32)  # MLP ratio 2
  # Each image gets its own prefix; the constant tokens alone do not decide it.
  assert not np.allclose(out[0], out[1], atol=1e-4)


def test_mlp_mapper_has_clipcaps_widths():
  mapper = prefix.MLPMapper(prefix_len=4, width=16)
  variables = jax.eval_shape(mapper.init, jax.random.key(0), jnp.ones((2, 24)))
  params = nn.meta.unbox(variables["params"])
  assert params["hidden"]["kernel"].shape == (24, 4 * 16 // 2)
  assert params["out"]["kernel"].shape == (32, 4 * 16)
  assert jax.eval_shape(mapper.apply, variables, jnp.ones((2, 24))).shape == (2, 4, 16)


def test_the_embedding_is_l2_normalised_before_the_mapper_in_training_and_inference(tiny):
  config, task, params, batch = tiny
  features = task.encode_images(params, batch["image"])
  assert features.shape == (2, 16)
  assert not np.allclose(np.linalg.norm(features, axis=-1), 1.0)  # stored raw
  prefix_of = jax.jit(lambda f: task.model.apply({"params": params}, f, method="prefix"))
  np.testing.assert_allclose(prefix_of(features), prefix_of(3.5 * features), atol=1e-5)
  loss = jax.jit(task.eval_loss)
  stored = lambda f: loss(params, {"features": f, "tokens": batch["tokens"]})
  np.testing.assert_allclose(stored(features), stored(0.2 * features), rtol=1e-6)
  np.testing.assert_allclose(stored(features), loss(params, batch), rtol=1e-6)
  raw = tasks.get(helpers.prefix_config("clip_prefix_small", **{"model.mapper.normalize": False}),
                  tokenizer_lib.SENTENCEPIECE_IDS)
  raw_prefix = jax.jit(lambda f: raw.model.apply({"params": params}, f, method="prefix"))
  assert not np.allclose(raw_prefix(features), raw_prefix(3.5 * features), atol=1e-3)


# ---------------------------------------------------------------------------- the loss


def test_loss_counts_caption_tokens_only():
  tokens = jnp.array([[BOS, 5, 6, EOS, 0, 0], [BOS, 7, EOS, 0, 0, 0]])
  inputs, targets, weights = prefix_lm.prefix_targets(tokens, prefix_len=3, eos_id=EOS)
  np.testing.assert_array_equal(inputs, tokens[:, :-1])
  assert targets.shape == weights.shape == (2, 3 + 5)
  np.testing.assert_array_equal(weights, [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(targets[:, 3:], tokens[:, 1:])
  logits = jax.random.normal(jax.random.key(0), (2, 8, 9))
  loss = lambda t: objectives.weighted_cross_entropy(logits, t, weights)
  # An image position's target (any id, e.g. the last one, which predicts BOS) or a token after
  # EOS does not count; a caption token does.
  assert loss(targets.at[:, :3].set(8)) == loss(targets)
  assert loss(targets.at[0, 7].set(8)) == loss(targets)
  assert loss(targets.at[0, 4].set(8)) != loss(targets)


def test_eos_counts_where_pad_is_eos():
  """GPT-2's vocabulary has one <|endoftext|> for BOS, EOS and PAD: EOS is still taught."""
  tokens = jnp.array([[9, 5, 6, 9, 9, 9]])
  _, _, weights = prefix_lm.prefix_targets(tokens, prefix_len=2, eos_id=9, pad_id=9)
  np.testing.assert_array_equal(weights, [[0, 0, 1, 1, 1, 0, 0]])
  # A row without EOS (zero-shot scoring of a caption's beginning) counts its words only.
  _, _, weights = prefix_lm.prefix_targets(jnp.array([[1, 5, 6, 0, 0]]), 2, eos_id=2, pad_id=0)
  np.testing.assert_array_equal(weights, [[0, 0, 1, 1, 0, 0]])


def test_noise_is_added_in_training_only(tiny):
  _, quiet, params, batch = tiny
  noisy = tasks.get(helpers.prefix_config("clip_prefix_small", **{"model.mapper.noise_std": 0.5}),
                    tokenizer_lib.SENTENCEPIECE_IDS)
  rng = jax.random.key(3)
  losses = jax.jit(lambda rng: (quiet.train_loss(params, batch, rng)[0],
                                quiet.eval_loss(params, batch),
                                noisy.train_loss(params, batch, rng)[0],
                                noisy.train_loss(params, batch, jax.random.fold_in(rng, 1))[0],
                                noisy.eval_loss(params, batch)))
  quiet_train, quiet_eval, noisy_train, noisy_other, noisy_eval = losses(rng)
  assert quiet_train == quiet_eval
  assert noisy_train != noisy_eval and noisy_train != noisy_other  # the step's rng decides
  assert noisy_train == losses(rng)[2]
  assert noisy_eval == quiet_eval
  np.testing.assert_array_equal(noisy.score_captions(params, batch["image"], batch["tokens"]),
                                quiet.score_captions(params, batch["image"], batch["tokens"]))
  np.testing.assert_array_equal(noisy.generate(params, batch["image"]),
                                quiet.generate(params, batch["image"]))


def test_scores_sum_the_caption_tokens_log_likelihood(tiny):
  _, task, params, batch = tiny
  scores = task.score_captions(params, batch["image"], batch["tokens"])
  logits = jax.jit(lambda t, x: task.model.apply({"params": params}, t, pixels=task.pixels(x)))(
      batch["tokens"][:, :-1], batch["image"])
  logp = jax.nn.log_softmax(logits[:, 3:])  # after the 3 prefix positions
  expected = [logp[0, 0, 5] + logp[0, 1, 6] + logp[0, 2, EOS], logp[1, 0, 7] + logp[1, 1, EOS]]
  np.testing.assert_allclose(scores, expected, rtol=1e-5)


# ------------------------------------------------------------------ frozen tower, training


@pytest.mark.slow
def test_training_leaves_the_tower_bitwise_unchanged_and_teaches_eos():
  config = helpers.prefix_config("clip_prefix_small", **{
      "model.mapper.kind": "transformer", "model.mapper.depth": 1, "model.mapper.num_heads": 2,
      "model.mapper.clip_len": 2, "schedule.peak_lr": 1e-2, "schedule.warmup_steps": 1})
  batch = helpers.caption_batch(config, [[BOS, 5, 6, EOS]] * 8)
  before, after = helpers.train_steps(config, batch, 40)
  assert helpers.bitwise_equal(after.params["vision"], before.params["vision"])
  for part in ("mapper", "lm"):
    assert not helpers.bitwise_equal(after.params[part], before.params[part]), part
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(after.opt_state)[0]]
  assert any("'mapper'" in p for p in paths) and any("'lm'" in p for p in paths)
  assert not any("'vision'" in p for p in paths), paths
  out = np.asarray(tasks.get(config, tokenizer_lib.SENTENCEPIECE_IDS).generate(
      after.params, batch["image"][:2]))
  np.testing.assert_array_equal(out, [[5, 6, EOS] + [0] * 21] * 2)  # then PAD


@pytest.mark.slow
def test_eos_is_taught_where_pad_and_bos_are_eos():
  """GPT-2's and SmolLM's vocabularies: one <|endoftext|> for BOS, EOS and PAD."""
  special = tokenizer_lib.SpecialIds(pad=9, bos=9, eos=9, mask=-1)
  config = helpers.prefix_config("clip_prefix_small", **{"schedule.peak_lr": 1e-2,
                                                         "schedule.warmup_steps": 1})
  batch = helpers.caption_batch(config, [[9, 5, 6, 9]] * 8)
  batch["tokens"][:, 4:] = 9
  _, after = helpers.train_steps(config, batch, 40, special)
  out = np.asarray(tasks.get(config, special).generate(after.params, batch["image"][:2]))
  np.testing.assert_array_equal(out, [[5, 6, 9] + [9] * 21] * 2)


def test_cached_greedy_equals_recomputing_the_whole_prefix_each_step(tiny):
  config, task, params, _ = tiny
  length = config.model.max_len
  images = helpers.caption_batch(config, [[BOS]] * 3, seed=2)["image"]
  cached = np.asarray(task.generate(params, images))
  tokens = np.full((3, length), BOS, np.int32)
  full = jax.jit(lambda t: task.model.apply({"params": params}, t, pixels=task.pixels(images)))
  for i in range(length):  # position 3 + i (after the prefix) predicts token i after BOS
    nxt = np.argmax(full(tokens)[:, 3 + i], -1)
    if i + 1 < length:
      tokens[:, i + 1] = nxt
    ended = (cached[:, :i] == EOS).any(1)
    np.testing.assert_array_equal(cached[:, i], np.where(ended, 0, nxt))


# ---------------------------------------------------------------------------- config


def test_config_errors_name_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"model.mapper.kind='projector'; "
                     r"task=clip_prefix takes one of \('mlp', 'transformer'\)"):
    helpers.prefix_config("clip_prefix_small", **{"model.mapper.kind": "projector"})
  with pytest.raises(config_lib.ConfigError, match="model.vision.family='vit'"):
    helpers.prefix_config("clip_prefix_small", **{"model.vision.family": "vit"})
  with pytest.raises(config_lib.ConfigError, match=r"need 27 positions; GPT-2 has "
                     "model.lm.max_len=20"):
    helpers.prefix_config("clip_prefix_small", **{"model.lm.max_len": 20})
  with pytest.raises(config_lib.ConfigError, match="model.mapper.noise_std=-0.1"):
    helpers.prefix_config("clip_prefix_small", **{"model.mapper.noise_std": -0.1})


def test_features_in_the_batch_spec_with_stored_features(tmp_path):
  config = helpers.prefix_config("clip_prefix_small", **{"data.features": str(tmp_path)})
  spec = tasks.get(config, tokenizer_lib.SENTENCEPIECE_IDS).batch_spec(4)
  assert set(spec) == {"features", "tokens"} and spec["features"].shape == (4, 16)
  plain = helpers.prefix_config("clip_prefix_small")
  assert set(tasks.get(plain, tokenizer_lib.SENTENCEPIECE_IDS).batch_spec(4)) == {
      "image", "tokens"}


# ------------------------------------------------------------------------ tokenizers


def test_a_hugging_face_tokenizer_reads_and_writes_captions(tmp_path):
  vocab, eot = helpers.bpe_directory(tmp_path / "lm")
  data = tokenizer_lib.hf_tokenizer_file(tmp_path / "lm", {"eos_token_id": eot})
  (tmp_path / "tokenizer.model").write_bytes(data)
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "tokenizer.model"))
  assert tok.special == tokenizer_lib.SpecialIds(pad=eot, bos=eot, eos=eot, mask=-1)
  assert tok.vocab_size == vocab
  ids = tok.encode("a small blue circle", 32)
  assert ids[0] == eot and ids.shape == (33,)
  body = ids[1:list(ids[1:]).index(eot) + 1]
  assert len(body) >= 4 and (ids[len(body) + 1:] == eot).all()
  assert tok.decode(ids) == "a small blue circle"  # the leading BOS (= EOS) is skipped
  assert tok.decode(ids[1:]) == "a small blue circle"
  with pytest.raises(tokenizer_lib.TokenizerError, match="no eos_token_id"):
    tokenizer_lib.hf_tokenizer_file(tmp_path / "lm", {})
  with pytest.raises(tokenizer_lib.TokenizerError, match=r"has no tokenizer \(tokenizer.json"):
    tokenizer_lib.hf_tokenizer_file(tmp_path, {"eos_token_id": 0})


def test_a_converted_clip_and_gpt2_load_through_init_vision_and_init_lm(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  torch = pytest.importorskip("torch", reason="needs the test-hf extra")
  t = pytest.importorskip("transformers", reason="needs the test-hf extra")
  from tools import convert_hf  # pylint: disable=g-import-not-at-top
  vocab, eot = helpers.bpe_directory(tmp_path / "gpt2_hf")
  torch.manual_seed(0)
  t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_positions=48, n_embd=24, n_layer=1,
                                 n_head=3, bos_token_id=eot, eos_token_id=eot)
                    ).save_pretrained(tmp_path / "gpt2_hf")
  t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(
      hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
      image_size=32, patch_size=16, projection_dim=12)).save_pretrained(tmp_path / "clip_hf")
  mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
  (tmp_path / "clip_hf" / "preprocessor_config.json").write_text(
      json.dumps({"image_mean": mean, "image_std": std}))
  for name in ("gpt2", "clip"):
    convert_hf.main([f"--src={tmp_path / (name + '_hf')}", f"--dst={tmp_path / name}"])
  config = helpers.prefix_config("clip_prefix_small", **{
      "init.vision": str(tmp_path / "clip"), "init.lm": str(tmp_path / "gpt2"),
      "data.image_size": 64})
  workdir = tmp_path / "run"
  run_config = tasks.prepare_run(config, str(workdir))
  v, lm = run_config.model.vision, run_config.model.lm
  assert (v.width, v.patch_size, v.projection_dim, run_config.data.image_size) == (24, 16, 12, 32)
  assert v.image_mean == tuple(mean) and v.image_std == tuple(std)
  assert (lm.width, lm.num_heads, lm.max_len, run_config.model.vocab_size) == (24, 3, 48, vocab)
  tok = tokenizer_lib.Tokenizer(str(workdir / "tokenizer.model"))
  assert tok.special.eos == eot and tok.decode(tok.encode("a red cross", 32)) == "a red cross"
  run = setup_lib.assemble(run_config, tok.special)
  with run.context():
    params = jax.device_get(run.init_state().params)
  for part, name in (("vision", "clip"), ("lm", "gpt2")):
    assert helpers.bitwise_equal(params[part], hf.load(tmp_path / name)[1]["params"]), part
  # The input pipeline reads the captions with GPT-2's BPE: BOS, words, EOS, then PAD (= EOS).
  batch = next(iter(pipeline.train_dataset(run_config, tok.path)))
  assert (batch["tokens"][:, 0] == eot).all() and batch["image"].shape == (8, 32, 32, 3)
  assert all(tok.decode(row) and (row[1:] == eot).any() for row in batch["tokens"])
  # A resumed run would take the keys from its checkpoint; without sources: one warning.
  assert tasks.prepare_run(helpers.prefix_config("clip_prefix_small"),
                           str(tmp_path / "other")).model.vision.width == 32
  assert "init.vision and init.lm not set" in caplog.text
  with pytest.raises(config_lib.ConfigError, match="init.lm=.*holds a clip_vision model"):
    tasks.prepare_run(helpers.prefix_config("clip_prefix_small", **{
        "init.lm": str(tmp_path / "clip")}), str(tmp_path / "bad"))


def test_the_captioner_captions_and_scores_with_the_tasks_decoder(tiny, tmp_path):
  config, task, params, batch = tiny
  tok = helpers.untrained(config, tmp_path / "tok.model").tokenizer
  captioner = captioner_lib.Captioner(trained_lib.Trained(config, task, params, tok, 0), 2)
  images = helpers.caption_batch(config, [[BOS]] * 3, seed=6)["image"]
  generated = np.asarray(task.generate(params, images))
  assert captioner.captions(images) == [[tok.decode(g)] for g in generated]
  captions = [["a small red circle", "two shapes a blue cross and a green square"]] * 3
  tokens = np.stack([captioner.tokenize(c) for c in captions[0]])
  expected = [task.score_captions(params, images, np.repeat(t[None], 3, 0)) for t in tokens]
  np.testing.assert_allclose(captioner.score(images, captions), np.stack(expected, 1),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="decode=parallel needs"):
    captioner.captions(images, decode="parallel")
  with pytest.raises(ValueError, match="no cross-attention"):
    captioner.attention(images, generated)


@pytest.mark.slow
def test_trains_then_captions_and_evaluates_through_the_commands(tmp_path, capsys):
  """clip_prefix through `capjax.train`, `capjax.caption` and `capjax.evaluate` (attributes,
  with the share of distinct captions)."""
  config = helpers.prefix_config("clip_prefix_small", **{"train.num_steps": 20,
                                                         "checkpoint.every": 20})
  train.train(config, str(tmp_path / "run"))
  tools_images = tmp_path / "images"
  from tools import shapes_images  # pylint: disable=g-import-not-at-top
  shapes_images.main([f"--output={tools_images}", "--num=3", "--image_size=32"])
  capsys.readouterr()
  caption.main([f"--workdir={tmp_path / 'run'}", str(tools_images), "--decode=beam",
                "--beam_size=2"])
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert len(lines) == 3 and all(isinstance(x["caption"], str) for x in lines)
  evaluate.main([f"--workdir={tmp_path / 'run'}", "--eval=attributes", "--num_examples=16"])
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert metrics["step"] == 20 and 0 < metrics["distinct_captions"] <= 1
  assert 0 <= metrics["attribute_accuracy"] <= 1
