"""Small shared fixtures for tests: a tiny shapes config, a random vocabulary head."""

import jax

from capjax import config as config_lib


# The tests train with AdamW (the shapes_tiny recipe before it moved to Shampoo): its steps
# compile in a fraction of the time, and the tests' expectations were set with it.
ADAMW = {"optimizer.name": "adamw", "optimizer.b2": 0.999, "schedule.peak_lr": 2e-3}


def tiny_config(**overrides):
  """shapes_tiny shrunk so a step compiles and runs in well under a second."""
  args = {"model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.enc_depth": 1,
          "model.dec_depth": 1, "model.num_registers": 2, "data.image_size": 32,
          "model.patch_size": 8, "train.batch_size": 16, "train.num_steps": 40,
          "train.log_every": 10, "eval.every": 40, "eval.num_examples": 32,
          "eval.batch_size": 32, "eval.num_captions": 1, "checkpoint.every": 0,
          "dtype": "float32", "wandb.mode": "disabled", "data.num_threads": 1,
          **ADAMW}
  args.update(overrides)
  return config_lib.load("shapes_tiny", [f"--config.{k}={v}" for k, v in args.items()])


def task(config):
  """The config's task, with the special ids of a tokenizer made by capjax."""
  from capjax import tasks  # pylint: disable=g-import-not-at-top
  from capjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  return tasks.get(config, tokenizer.SENTENCEPIECE_IDS)


def abstract_params(config):
  """Boxed (logically annotated) param shapes of the config's model; nothing allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(task(config).init_params, jax.random.key(0))


def optimizer(config):
  """The config's optimizer, given its model's logical param axes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from capjax.optim import factory  # pylint: disable=g-import-not-at-top
  return factory.make_optimizer(config, nn.get_partition_spec(abstract_params(config)))


def random_head(params, seed: int = 0):
  """params with a random vocabulary projection: the model initialises it to zero, which
  makes a fresh model's logits (and every other param's gradient) independent of its input."""
  kernel = params["decoder"]["logits"]["kernel"]
  fan_in = kernel.shape[0]
  decoder = {**params["decoder"], "logits": {"kernel": jax.random.normal(
      jax.random.key(seed), kernel.shape, kernel.dtype) / fan_in**0.5}}
  return {**params, "decoder": decoder}


def untrained(config, tokenizer_path):
  """A `trained.Trained` of the config without params (step 0), with a word tokenizer trained
  on shapes captions at `tokenizer_path`."""
  from capjax import trained  # pylint: disable=g-import-not-at-top
  from capjax.data import synthetic, tokenizer  # pylint: disable=g-import-not-at-top
  source = synthetic.ShapesSource("train", 200, image_size=config.data.image_size)
  tok = tokenizer.train((c for i in range(200) for c in source[i]["captions"]),
                        str(tokenizer_path), 64, "word")
  return trained.Trained(config, task(config), {}, tok, 0)


def filled_params(config, fill):
  """Params of the config's model drawn by `fill(shape) -> np.ndarray` (no init compiled)."""
  from capjax import sharding  # pylint: disable=g-import-not-at-top
  shapes = sharding.unbox_shapes(abstract_params(config))
  return jax.tree.map(lambda s: fill(s.shape).astype(s.dtype), shapes)


# The prefix-LM presets shrunk the same way (clip_prefix_small, mini_vlm_small).
TINY_PREFIX = {"model.vision.width": 32, "model.vision.depth": 1, "model.vision.num_heads": 2,
               "model.vision.mlp_dim": 64, "model.lm.width": 32, "model.lm.depth": 1,
               "model.lm.num_heads": 2, "model.lm.mlp_dim": 64, "data.image_size": 32,
               "train.batch_size": 8, "train.num_steps": 6, "train.log_every": 3,
               "eval.every": 0, "checkpoint.every": 0, "dtype": "float32",
               "wandb.mode": "disabled", "data.num_threads": 1, "schedule.warmup_steps": 2}


def prefix_config(preset: str, **overrides):
  """A tiny clip_prefix_small / mini_vlm_small config (float32, one layer each)."""
  extra = ({"model.vision.projection_dim": 16, "model.mapper.prefix_len": 3}
           if preset.startswith("clip_prefix") else {"model.lm.num_kv_heads": 1})
  args = {**TINY_PREFIX, **extra, **overrides}
  return config_lib.load(preset, [f"--config.{k}={v}" for k, v in args.items()])


def bitwise_equal(a, b) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
      for x, y in zip(leaves_a, leaves_b))


def caption_batch(config, rows, seed: int = 0):
  """{"image": random uint8, "tokens": `rows` ([BOS w .. EOS], padded with 0)} for `config`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  s, length = config.data.image_size, config.model.max_len + 1
  tokens = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  images = np.random.default_rng(seed).integers(0, 256, (len(rows), s, s, 3), np.uint8)
  return {"image": images, "tokens": tokens}


def train_steps(config, batch, num_steps: int, special=None):
  """(initial state, final state) after `num_steps` train steps on one batch, assembled as
  train.py assembles a run (`capjax.setup`)."""
  from capjax import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from capjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  run = setup_lib.assemble(config, special or tokenizer.SENTENCEPIECE_IDS)
  with run.context():
    state = run.init_state()
    initial = jax.device_get(state)
    for _ in range(num_steps):
      state, _ = run.train_step(state, run.global_batch(batch))
    return initial, jax.device_get(state)


def bpe_directory(path, vocab_size: int = 300):
  """A byte-level BPE trained on a few captions, saved as tokenizer.json (GPT-2's kind)."""
  import pytest  # pylint: disable=g-import-not-at-top
  tk = pytest.importorskip("tokenizers")
  bpe = tk.Tokenizer(tk.models.BPE())
  bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(["a small red circle", "a large blue square left of a cross",
                           "two shapes a green triangle and a white circle"] * 5, trainer)
  path.mkdir(parents=True, exist_ok=True)
  bpe.save(str(path / "tokenizer.json"))
  return bpe.get_vocab_size(), bpe.token_to_id("<|endoftext|>")
