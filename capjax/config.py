"""Load a preset from configs/ by name (or a path) and apply `--config.a.b=value` overrides."""

import ast
import importlib.util
import os
from pathlib import Path

import ml_collections

CONFIG_DIR = Path(os.environ.get("CAPJAX_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


class ConfigError(ValueError):
  """A user error in --config or its overrides; its message is one line."""


def resolve_path(name_or_path: str) -> Path:
  """A file path (`*.py`, or any existing file) or a preset name. A directory named like a
  preset (e.g. a workdir `shapes_tiny/`) is not a config file: the preset is meant."""
  path = Path(name_or_path)
  if path.suffix == ".py" or path.is_file():
    if not path.is_file():
      raise ConfigError(f"Config file not found: {path}")
    return path
  path = CONFIG_DIR / f"{name_or_path}.py"
  if not path.exists():
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(f"Unknown config {name_or_path!r}; expected one of {known} or a path.")
  return path


def load_preset(name_or_path: str) -> ml_collections.ConfigDict:
  path = resolve_path(name_or_path)
  spec = importlib.util.spec_from_file_location(f"capjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_value(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"Expected a boolean, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f"Expected {type(current).__name__}, got {text!r}")
  return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str):
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if parents[:i] == ["evals"] and isinstance(node, ml_collections.ConfigDict) \
        and part not in node:  # --config.evals.NAME.KEY=V adds evaluator NAME
      with node.unlocked():
        node[part] = ml_collections.ConfigDict()
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"Unknown config key {'.'.join(parents[:i + 1])!r} in --config.{key}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict) and leaf not in node:
    default = optional_key_default(parents, leaf)
    if default is not None:
      with node.unlocked():
        node[leaf] = default
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"Unknown config key {key!r} in --config.{key}={text}")
  try:
    value = parse_value(text, node[leaf])
  except ConfigError as e:
    raise ConfigError(f"Bad value for --config.{key}: {e}") from None
  with node.ignore_type():
    node[leaf] = value


def optional_key_default(parents: list[str], leaf: str):
  """Default of a key a preset may leave out, or None: an optimizer's own `optimizer.*` keys
  (a preset lists only its optimizer's, yet `--config.optimizer.name=shampoo
  --config.optimizer.block_size=64` must work), and `evals.NAME.*` (capjax.evals)."""
  if parents == ["optimizer"]:
    from capjax.optim import factory  # pylint: disable=g-import-not-at-top
    return factory.key_default(leaf)
  if len(parents) == 2 and parents[0] == "evals":
    from capjax import evals  # pylint: disable=g-import-not-at-top
    return evals.new_entry_default(parents[1], leaf)
  return None


def split_override(arg: str) -> tuple[str, str]:
  if not arg.startswith("--config.") or "=" not in arg:
    raise ConfigError(f"Unrecognized argument {arg!r}; overrides look like --config.a.b=value")
  key, text = arg[len("--config."):].split("=", 1)
  return key, text


def load(name_or_path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """The preset with its overrides, validated (a `ConfigError` names the first bad key)."""
  config = load_preset(name_or_path)
  for arg in overrides:
    apply_override(config, *split_override(arg))
  validate(config)
  config.lock()
  return config


# Keys with a range, (low, high) inclusive, None for unbounded. Checked at load time, before
# anything is compiled or written; a task adds its own checks (`Task.check_config`).
RANGES = {
    "seed": (0, None), "train.num_steps": (1, None), "train.batch_size": (1, None),
    "train.log_every": (1, None), "train.grad_clip_norm": (0, None),
    "train.max_consecutive_skips": (0, None), "eval.every": (0, None),
    "eval.num_examples": (1, None), "eval.batch_size": (1, None), "eval.num_captions": (0, None),
    "checkpoint.every": (0, None), "checkpoint.keep": (0, None), "checkpoint.keep_period": (0, None),
    "data.image_size": (1, None), "data.num_threads": (1, None), "data.prefetch": (0, None),
    "data.num_workers": (0, None), "data.max_image_pixels": (1, None), "data.timeout_s": (1, None),
    "tokenizer.vocab_size": (8, None), "schedule.peak_lr": (0, None),
    "schedule.warmup_steps": (0, None), "schedule.end_lr_fraction": (0, 1),
    "optimizer.b1": (0, 1), "optimizer.b2": (0, 1), "optimizer.eps": (0, None),
    "optimizer.weight_decay": (0, None),
}
MESH_KEYS = ("mesh.data", "mesh.fsdp", "mesh.tensor")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def check_range(key: str, value, low=None, high=None):
  """A `ConfigError` naming key, value and range when `value` is outside [low, high]."""
  if (low is not None and value < low) or (high is not None and value > high):
    expected = (f"in [{low}, {high}]" if low is not None and high is not None
                else f">= {low}" if low is not None else f"<= {high}")
    raise ConfigError(f"{key}={value!r} is out of range: expected {expected}.")


def validate(config: ml_collections.ConfigDict):
  """Range checks of the generic keys, then the task's own (`Task.check_config`)."""
  for key, (low, high) in RANGES.items():
    value = _get(config, key)
    if value is not None and not isinstance(value, bool):
      check_range(key, value, low, high)
  for key in MESH_KEYS:
    value = _get(config, key)
    if value is not None and value != -1 and value < 1:
      raise ConfigError(f"{key}={value!r} is out of range: expected -1 (the rest) or >= 1.")
  from capjax import evals, tasks  # pylint: disable=g-import-not-at-top  # they import this module
  tasks.check_config(config)
  evals.check_config(config)


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config saved with a run, over today's `base()`: keys added since (e.g. `task`; every run
  before it was CapPa) take their defaults, so older checkpoints still load."""
  def merge(into: ml_collections.ConfigDict, values: dict):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
        merge(into[key], value)
      else:
        with into.ignore_type():
          into[key] = value
  config = base()
  merge(config, saved)
  return config


DEFAULT_SHARDING_RULES = (
    # params
    ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
    ("vocab", "tensor"), ("patch", None), ("layers", None),
    # activations; act_batch also splits the input batches
    ("act_batch", ("data", "fsdp")), ("act_len", None), ("act_embed", None),
    ("act_mlp", "tensor"),
    # optimizer-state leaves that mirror no param (Shampoo's block statistics)
    ("opt_stats", "fsdp"),
)


def base() -> ml_collections.ConfigDict:
  """Keys every preset has; presets override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"
  c.task = "cappa"  # capjax/tasks/: the model family, its losses and predict functions
  c.model = dict(vocab_size=32_000, max_len=64, patch_size=16, width=768,
                 enc_depth=12, dec_depth=6, mlp_dim=2048, num_heads=12, num_registers=8,
                 dec_width=0, dec_mlp_dim=0,  # decoder's own sizes; 0: width, mlp_dim
                 remat_policy="none", scan_unroll=1,  # blocks per scan iteration
                 matmul_policy="f32_accum",  # f32_accum | legacy (capjax/models/layers.py)
                 head_init="zeros",  # zeros (big_vision, clip-jax: initial loss ln V) | fan_in
                 # task=siglit (capjax/tasks/siglit.py): the text tower, the image tower's
                 # pooling, the embedding size (0: the image tower's width) and the sigmoid
                 # loss's learned temperature and bias (big_vision siglip_lit_coco: 10, -2.71)
                 text=dict(width=128, depth=2, mlp_dim=256, num_heads=4),
                 image_pool="map", embed_dim=0, temperature_init=10.0, bias_init=-2.71,
                 # task=clip_prefix / mini_vlm (capjax/tasks/prefix_lm.py): a frozen vision
                 # tower, a mapper and a language model. The tower's and the LM's keys mirror
                 # capjax.models.hf's module configs; init.vision / init.lm fill them in (and
                 # model.vocab_size, data.image_size). vision.family: clip_vision | vit;
                 # lm.family: gpt2 | llama; lm.frozen: train the mapper only.
                 vision=dict(family="clip_vision", patch_size=32, width=768, depth=12,
                             num_heads=12, mlp_dim=3072, projection_dim=512, qkv_bias=True,
                             activation="quick_gelu", norm_eps=1e-5,
                             image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
                 lm=dict(family="gpt2", max_len=1024, width=768, depth=12, num_heads=12,
                         num_kv_heads=0, head_dim=0, mlp_dim=3072, rope_theta=10_000.0,
                         norm_eps=1e-5, tie_embeddings=True, activation="gelu_new",
                         frozen=False),
                 # mapper.kind: mlp | transformer (ClipCap; clip_len, depth, num_heads,
                 # mlp_ratio are the transformer's, hidden_dim the MLP's, 0: P*D/2) | projector
                 # (seed 004, per patch token); normalize: L2 before the mapper; noise_std:
                 # Gaussian noise added to the features in training only.
                 mapper=dict(kind="mlp", prefix_len=10, clip_len=10, depth=8, num_heads=8,
                             mlp_ratio=2.0, hidden_dim=0, normalize=True, noise_std=0.0))
  c.data = dict(
      name="shapes", dir="", image_size=224, num_threads=2, prefetch=8, num_workers=0,
      resize="center_crop",  # center_crop | letterbox | random_resized_crop (train only)
      lowercase=False, strip_punctuation=False,  # caption cleaning before tokenization
      max_image_pixels=89_478_485,  # decompression-bomb guard (PIL's default)
      shards_format="array_record",  # shards: array_record | tfds
      timeout_s=600,  # no training batch for this long: a one-line error naming the skips
      restval_to_train=True, karpathy_json="",  # coco
      # Frozen-tower features stored by tools/precompute_features.py: training reads them
      # instead of the images (clip_prefix, mini_vlm); "": run the tower every step.
      features="")
  # Pretrained parts a task loads when a run starts fresh (never on resume: the checkpoint has
  # them): a capjax workdir or export (`Task.prepare_run`, `Task.pretrained_params`).
  # image_tower: siglit's. vision / lm: a Hugging Face or converted model directory
  # (tools/convert_hf.py) for clip_prefix / mini_vlm.
  c.init = dict(image_tower="", vision="", lm="")
  c.tokenizer = dict(path="", model_type="unigram", vocab_size=32_000)
  c.objective = dict(masked_pred_prob=0.75,
                     loss_normalization="per_example")  # per_example | per_token (objectives.py)
  c.train = dict(num_steps=1000, batch_size=64, log_every=50, grad_clip_norm=1.0,
                 nonfinite="skip",  # skip|stop
                 inject_nan_at_step=-1, inject_nan_steps=1,  # fault injection (tests); -1: off
                 max_consecutive_skips=100,  # skip mode stops after this many in a row; 0: never
                 allow_restart=False)  # start from step 0 over an earlier run's files
  c.eval = dict(every=500, num_examples=256, batch_size=64, num_captions=4)
  # Evaluators run during training: {name: {"every": N, option: value}} (capjax/evals/).
  c.evals = ml_collections.ConfigDict()
  c.checkpoint = dict(every=500, keep=3, keep_period=0, allow_data_restart=False)  # see README
  c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
  c.schedule = dict(name="warmup_cosine", peak_lr=1e-3, warmup_steps=100, end_lr_fraction=0.01)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding = dict(rules=DEFAULT_SHARDING_RULES)
  c.wandb = dict(mode="offline", project="capjax", name="")
  return c
