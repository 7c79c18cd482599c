"""What the prefix-LM captioners share (`clip_prefix.py`, `mini_vlm.py`): a frozen vision tower,
a mapper trained from scratch and a language model (GPT-2 or Llama-family) that reads the
mapper's prefix before the caption (`capjax.models.prefix.PrefixCaptioner`).

Params {"vision", "mapper", "lm"}. The tower is frozen through the optimizer's trainable mask
(no optimizer state, no update, no backward pass); the LM trains unless `model.lm.frozen`.

Pretrained parts: `init.vision` / `init.lm` name a Hugging Face or converted model directory
(`capjax.models.hf`, `tools/convert_hf.py`). `prepare_run` fills in what the config takes from
them (`model.vision.*`, `model.lm.*`, `model.vocab_size`, `data.image_size`, the pixel mean and
std of `preprocessor_config.json`) and puts the LM's own tokenizer in the workdir
(`tokenizer.hf_tokenizer_file`); `pretrained_params` loads their params when a run starts fresh.
A resumed run takes those keys from its checkpoint and reads neither source again. Without
them: one warning, random parts of the preset's sizes and a capjax-trained tokenizer.

Sequence: the LM reads [prefix (P) ++ BOS w1 .. wn EOS PAD ..] (P + max_len positions). The
targets at the P image positions have weight 0; the caption's count through its first EOS (so
EOS is taught and generation ends; PAD may equal EOS, as in GPT-2's vocabulary).

Training reads images (the tower runs every step) or, with `data.features=DIR`, the tower's
outputs stored by `tools/precompute_features.py` (batch key "features"); validation, scoring and
generation read images.

Analytic FLOPs per example: the tower's forward once (none with stored features), 3 x the
mapper's forward, and the LM's forward times 3 (trained) or 2 (frozen: the mapper's gradient
still passes back through it).
"""

import functools
import json
import logging
import pathlib

import jax
import jax.numpy as jnp

from capjax import checkpoint, config as config_lib, decode, objectives
from capjax.data import features as features_lib, tokenizer as tokenizer_lib
from capjax.decode import prefix as decode_prefix
from capjax.models import blocks, hf, layers, prefix as prefix_lib
from capjax.tasks import base

LM_FAMILIES = ("gpt2", "llama")
# The module-config keys each family takes from a source directory (capjax.models.hf).
VISION_KEYS = {"clip_vision": ("patch_size", "width", "depth", "num_heads", "mlp_dim",
                               "projection_dim", "activation", "norm_eps"),
               "vit": ("patch_size", "width", "depth", "num_heads", "mlp_dim", "qkv_bias",
                       "activation", "norm_eps")}
LM_KEYS = {"gpt2": ("max_len", "width", "depth", "num_heads", "mlp_dim", "activation",
                    "norm_eps"),
           "llama": ("width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "rope_theta", "norm_eps", "tie_embeddings", "activation")}
# What a resumed run takes from its own checkpoint (what the sources filled in).
PRETRAINED_KEYS = tuple(sorted(
    {"model.vision.family", "model.vision.image_mean", "model.vision.image_std",
     "model.lm.family", "model.vocab_size", "data.image_size"}
    | {f"model.vision.{k}" for keys in VISION_KEYS.values() for k in keys}
    | {f"model.lm.{k}" for keys in LM_KEYS.values() for k in keys}))


def _plain(value):
  """Lists (a config read back from JSON) as tuples, as the presets write them."""
  return tuple(value) if isinstance(value, list) else value


def prefix_targets(tokens_BxL1, prefix_len: int, eos_id: int, pad_id: int = 0):
  """(LM token inputs B x L, targets B x (P+L), weights B x (P+L)) for [prefix ++ inputs]:
  position t predicts position t + 1. The P image positions (the last predicts BOS) get
  `pad_id` with weight 0; the caption's targets weight 1 through the first EOS, PAD excluded
  where PAD is not EOS (a row without EOS, as zero-shot prefixes, counts its words only)."""
  inputs_BxL, caption_BxL = objectives.split_inputs_targets(tokens_BxL1)
  b = tokens_BxL1.shape[0]
  caption_weights = objectives.caption_weights(caption_BxL, eos_id, pad_id)
  targets = jnp.concatenate([jnp.full((b, prefix_len), pad_id, caption_BxL.dtype),
                             caption_BxL], axis=1)
  weights = jnp.concatenate([jnp.zeros((b, prefix_len), jnp.float32), caption_weights], axis=1)
  return inputs_BxL, targets, weights


def tower_macs(config) -> float:
  v, t = config.model.vision, prefix_lib.vision_tokens(config)
  macs = (t - 1) * v.patch_size**2 * 3 * v.width + v.depth * (
      4 * t * v.width**2 + 2 * t * t * v.width + 2 * t * v.width * v.mlp_dim)
  return macs + (v.width * v.projection_dim if v.family == "clip_vision" else 0)


def lm_macs(config, length: int) -> float:
  m, lm = config.model, config.model.lm
  k = lm.head_dim or lm.width // lm.num_heads
  g = lm.num_kv_heads or lm.num_heads
  gated = 3 if lm.family == "llama" else 2
  per_layer = length * (2 * lm.width * lm.num_heads * k + 2 * lm.width * g * k
                        + gated * lm.width * lm.mlp_dim) + 2 * length * length * lm.num_heads * k
  return lm.depth * per_layer + length * lm.width * m.vocab_size


class PrefixLMTask(base.Task):
  """Batches: {"image": uint8[B, S, S, 3] or "features": float32[B, ...] (data.features),
  "tokens": int32[B, max_len + 1]} (BOS .. EOS PAD)."""
  FEATURES = "embedding"  # what the mapper reads of the tower: "embedding" | "tokens"
  VISION_FAMILIES = ("clip_vision", "vit")
  MAPPERS = ("mlp", "transformer")

  # ------------------------------------------------------------------ config

  @classmethod
  def prefix_len(cls, config) -> int:
    if config.model.mapper.kind == "projector":
      return prefix_lib.vision_tokens(config)
    return config.model.mapper.prefix_len

  @classmethod
  def feature_shape(cls, config) -> tuple[int, ...]:
    v = config.model.vision
    if cls.FEATURES == "tokens":
      return (prefix_lib.vision_tokens(config), v.width)
    return (v.projection_dim or v.width,) if v.family == "clip_vision" else (v.width,)

  @classmethod
  def check_config(cls, config):
    m, c = config.model, config_lib
    v, lm, mp = m.vision, m.lm, m.mapper
    choices = (("model.vision.family", v.family, cls.VISION_FAMILIES),
               ("model.lm.family", lm.family, LM_FAMILIES),
               ("model.mapper.kind", mp.kind, cls.MAPPERS),
               ("model.vision.activation", v.activation, tuple(blocks.ACTIVATIONS)),
               ("model.lm.activation", lm.activation, tuple(blocks.ACTIVATIONS)),
               ("objective.loss_normalization", config.objective.loss_normalization,
                objectives.LOSS_NORMALIZATIONS))
    for key, value, allowed in choices:
      if value not in allowed:
        raise c.ConfigError(f"{key}={value!r}; task={config.task} takes one of {allowed}.")
    for key in ("vocab_size", "scan_unroll", "vision.patch_size", "vision.width", "vision.depth",
                "vision.num_heads", "vision.mlp_dim", "lm.width", "lm.depth", "lm.num_heads",
                "lm.mlp_dim", "lm.max_len", "mapper.prefix_len", "mapper.clip_len",
                "mapper.depth", "mapper.num_heads"):
      c.check_range(f"model.{key}", base.get_key(m, key), 1)
    for key in ("vision.projection_dim", "lm.num_kv_heads", "lm.head_dim", "mapper.hidden_dim",
                "mapper.noise_std"):
      c.check_range(f"model.{key}", base.get_key(m, key), 0)
    c.check_range("model.max_len", m.max_len, 2)
    try:
      layers.check_matmul_policy(m.matmul_policy)
    except ValueError as e:
      raise c.ConfigError(str(e)) from None
    if not mp.mlp_ratio > 0:
      raise c.ConfigError(f"model.mapper.mlp_ratio={mp.mlp_ratio!r} is out of range: "
                          "expected > 0.")
    for key in ("image_mean", "image_std"):
      if len(v[key]) != 3 or (key == "image_std" and min(v[key]) <= 0):
        raise c.ConfigError(f"model.vision.{key}={v[key]!r}; expected 3 values (RGB)"
                            + (", each > 0." if key == "image_std" else "."))
    if config.data.features and config.data.resize == "random_resized_crop":
      raise c.ConfigError("data.resize='random_resized_crop' with data.features: stored "
                          "features are of one crop; use center_crop or letterbox.")
    if config.data.image_size % v.patch_size:
      raise c.ConfigError(f"data.image_size={config.data.image_size} is not divisible by "
                          f"model.vision.patch_size={v.patch_size}.")
    divisible = [("model.vision.width", v.width, "model.vision.num_heads", v.num_heads),
                 ("model.lm.num_heads", lm.num_heads, "model.lm.num_kv_heads",
                  lm.num_kv_heads or lm.num_heads)]
    if not lm.head_dim:
      divisible.append(("model.lm.width", lm.width, "model.lm.num_heads", lm.num_heads))
    if mp.kind == "transformer":
      divisible.append(("model.lm.width", lm.width, "model.mapper.num_heads", mp.num_heads))
    for key, value, by_key, by in divisible:
      if value % by:
        raise c.ConfigError(f"{key}={value} is not divisible by {by_key}={by}.")
    length = cls.prefix_len(config) + m.max_len
    if lm.family == "gpt2" and length > lm.max_len:
      raise c.ConfigError(f"the prefix ({cls.prefix_len(config)}) and model.max_len="
                          f"{m.max_len} need {length} positions; GPT-2 has "
                          f"model.lm.max_len={lm.max_len}.")

  @classmethod
  def _vision_values(cls, source: str) -> dict:
    try:
      family, module_config, _ = hf.describe(source)
    except ValueError as e:
      raise config_lib.ConfigError(f"init.vision={source}: {e}") from None
    if family not in cls.VISION_FAMILIES:
      raise config_lib.ConfigError(f"init.vision={source} holds a {family} model; "
                                   f"{cls.__name__} takes one of {cls.VISION_FAMILIES}.")
    values = {"model.vision.family": family, "data.image_size": module_config["image_size"],
              **{f"model.vision.{k}": module_config[k] for k in VISION_KEYS[family]}}
    processor = pathlib.Path(source) / "preprocessor_config.json"
    if processor.exists():
      p = json.loads(processor.read_text())
      values.update({f"model.vision.{k}": tuple(float(x) for x in p[k])
                     for k in ("image_mean", "image_std") if k in p})
    return values

  @classmethod
  def _lm_values(cls, source: str) -> tuple[dict, bytes]:
    try:
      family, module_config, hf_config = hf.describe(source)
      if family not in LM_FAMILIES:
        raise config_lib.ConfigError(f"init.lm={source} holds a {family} model; "
                                     f"{cls.__name__} takes one of {LM_FAMILIES}.")
      tokenizer = tokenizer_lib.hf_tokenizer_file(source, hf_config)
    except config_lib.ConfigError:
      raise
    except ValueError as e:  # TokenizerError is one
      raise config_lib.ConfigError(f"init.lm={source}: {e}") from None
    values = {"model.lm.family": family, "model.vocab_size": module_config["vocab_size"],
              **{f"model.lm.{k}": module_config[k] for k in LM_KEYS[family]}}
    return values, tokenizer

  @classmethod
  def prepare_run(cls, config, workdir):
    resumed = base.resumed_config(workdir)
    if resumed is not None:  # the checkpoint has the pretrained parts; no source is read
      values = {k: _plain(base.get_key(resumed, k)) for k in PRETRAINED_KEYS}
      config = base.with_values(config, values, f"the checkpoint in {workdir}")
      cls.check_features(config)
      return config
    values, tokenizer = {}, None
    if config.init.vision:
      values.update(cls._vision_values(config.init.vision))
    if config.init.lm:
      lm_values, tokenizer = cls._lm_values(config.init.lm)
      values.update(lm_values)
    missing = [key for key in ("init.vision", "init.lm") if not base.get_key(config, key)]
    if missing:
      what = {"init.vision": "the frozen vision tower",
              "init.lm": "the language model (with a capjax-trained tokenizer)"}
      logging.warning("%s: %s not set: %s start from a random init of the preset's sizes "
                      "(pretrained: --config.%s=DIR, a model directory tools/convert_hf.py "
                      "converts)", config.task, " and ".join(missing),
                      " and ".join(what[k] for k in missing), missing[0])
    config = base.with_values(config, values, "init.vision / init.lm")
    if tokenizer is not None:
      base.install_tokenizer(config, workdir, tokenizer, f"init.lm={config.init.lm}")
    cls.check_features(config)
    return config

  @classmethod
  def check_features(cls, config):
    """Stored features (`data.features`) must be this run's tower's (a one-line error)."""
    if config.data.features:
      features_lib.check_fits(config.data.features, config, cls.feature_shape(config))

  # ------------------------------------------------------------------ model

  def build_model(self):
    return prefix_lib.from_config(self.config, self.FEATURES)

  def batch_spec(self, batch_size):
    spec = base.caption_batch_spec(self.config, batch_size)
    if self.config.data.features:
      del spec["image"]
      spec["features"] = jax.ShapeDtypeStruct(
          (batch_size,) + self.feature_shape(self.config), jnp.float32)
    return spec

  def init_inputs(self):
    s = self.config.data.image_size
    return (jnp.zeros((1, self.config.model.max_len), jnp.int32),
            jnp.zeros((1, s, s, 3), self.dtype))

  def trainable(self, params):
    """The vision tower is frozen; the mapper trains, the LM unless model.lm.frozen."""
    train = {"vision": False, "mapper": True, "lm": not self.config.model.lm.frozen}
    return {name: jax.tree.map(lambda _, t=train[name]: t, sub) for name, sub in params.items()}

  def pretrained_params(self, params):
    loaded = {}
    for part, key in (("vision", "init.vision"), ("lm", "init.lm")):
      source = base.get_key(self.config, key)
      if not source:
        continue
      try:
        _, variables = hf.load(source)
      except ValueError as e:
        raise config_lib.ConfigError(f"{key}={source}: {e}") from None
      mismatch = checkpoint.first_mismatch(checkpoint.flat_shapes(variables["params"]),
                                           checkpoint.flat_shapes(params[part]))
      if mismatch:
        raise config_lib.ConfigError(f"{key}={source} does not fit this config's "
                                     f"model.{part}.*: {mismatch}.")
      loaded[part] = variables["params"]
    return {**params, **loaded} if loaded else params

  # ------------------------------------------------------------------ losses

  def pixels(self, images_uint8):
    """uint8 -> the tower's input: (x / 255 - mean) / std per channel, in the compute dtype."""
    v = self.config.model.vision
    x = images_uint8.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(v.image_mean)) / jnp.asarray(v.image_std)).astype(self.dtype)

  def _features(self, params, batch):
    if "features" in batch:
      return batch["features"]
    return self.model.apply({"params": params}, self.pixels(batch["image"]), method="features")

  def _logits_and_targets(self, params, batch, rng=None):
    features = self._features(params, batch)
    std, noise = self.config.model.mapper.noise_std, None
    if rng is not None and std > 0:
      noise = std * jax.random.normal(rng, features.shape, jnp.float32)
    inputs_BxL, targets, weights = prefix_targets(
        batch["tokens"], self.prefix_len(self.config), self.special.eos, self.special.pad)
    logits = self.model.apply({"params": params}, inputs_BxL, features=features, noise=noise)
    return logits, targets, weights

  def _loss(self, params, batch, rng=None):
    return objectives.weighted_cross_entropy(*self._logits_and_targets(params, batch, rng),
                                             self.config.objective.loss_normalization)

  def train_loss(self, params, batch, rng):
    """The caption loss, with noise on the features (model.mapper.noise_std) from the step's
    rng."""
    return self._loss(params, batch, rng), {}

  def eval_loss(self, params, batch):
    return self._loss(params, batch)

  def flops_per_example(self):
    c = self.config
    mp, p, width = c.model.mapper, self.prefix_len(c), c.model.lm.width
    f = self.feature_shape(c)[-1]
    if mp.kind == "mlp":
      hidden = mp.hidden_dim or p * width // 2
      mapper_macs = f * hidden + hidden * p * width
    elif mp.kind == "transformer":
      t, mlp = mp.clip_len + p, int(width * mp.mlp_ratio)
      mapper_macs = f * mp.clip_len * width + mp.depth * (
          4 * t * width**2 + 2 * t * t * width + 2 * t * width * mlp)
    else:
      mapper_macs = p * (f * width + width * width)
    lm_passes = 2 if c.model.lm.frozen else 3
    tower = 0 if c.data.features else tower_macs(c)
    return 2.0 * (tower + 3 * mapper_macs + lm_passes * lm_macs(c, p + c.model.max_len))

  # ------------------------------------------------------------------ predict

  def predict_fns(self):
    return {"encode_images": self.encode_images, "score_captions": self.score_captions,
            "generate": self.generate}

  @functools.partial(jax.jit, static_argnums=0)
  def encode_images(self, params, images_uint8):
    """float32: the frozen tower's features (what `data.features` stores)."""
    return self.model.apply({"params": params}, self.pixels(images_uint8), method="features")

  def decoder(self):
    return decode_prefix.PrefixDecoder(self.model)

  @functools.partial(jax.jit, static_argnums=0)
  def score_captions(self, params, images_uint8, tokens_BxL1):
    """float32[B]: summed log-likelihood of each caption's tokens after BOS through its first
    EOS, teacher-forced (as CapPa's; not length-normalised)."""
    decoder = self.decoder()
    prefix = decoder.encode(params, self.pixels(images_uint8))
    return decoder.log_likelihood(params, prefix, tokens_BxL1[:, None], self.special)[:, 0]

  def generate(self, params, images_uint8):
    """int32[B, max_len]: greedy tokens after BOS, EOS-terminated, then PAD (KV-cached)."""
    return decode.greedy(self.decoder(), params, self.pixels(images_uint8), special=self.special,
                         max_new_tokens=self.config.model.max_len).tokens[:, 0]
