"""Small shared fixtures for tests: a tiny shapes config, a random vocabulary head."""

import jax

from capjax import config as config_lib


def tiny_config(**overrides):
  """shapes_tiny shrunk so a step compiles and runs in well under a second."""
  args = {"model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.enc_depth": 1,
          "model.dec_depth": 1, "model.num_registers": 2, "data.image_size": 32,
          "model.patch_size": 8, "train.batch_size": 16, "train.num_steps": 40,
          "train.log_every": 10, "eval.every": 40, "eval.num_examples": 32,
          "eval.batch_size": 32, "eval.num_captions": 1, "checkpoint.every": 0,
          "dtype": "float32", "wandb.mode": "disabled", "data.num_threads": 1}
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
