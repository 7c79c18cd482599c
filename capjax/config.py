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
  path = Path(name_or_path)
  if path.suffix == ".py" or path.exists():
    if not path.exists():
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
  --config.optimizer.block_size=64` must work)."""
  if parents == ["optimizer"]:
    from capjax.optim import factory  # pylint: disable=g-import-not-at-top
    return factory.key_default(leaf)
  return None


def split_override(arg: str) -> tuple[str, str]:
  if not arg.startswith("--config.") or "=" not in arg:
    raise ConfigError(f"Unrecognized argument {arg!r}; overrides look like --config.a.b=value")
  key, text = arg[len("--config."):].split("=", 1)
  return key, text


def load(name_or_path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  config = load_preset(name_or_path)
  for arg in overrides:
    apply_override(config, *split_override(arg))
  config.lock()
  return config


DEFAULT_SHARDING_RULES = (
    # params
    ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
    ("vocab", "tensor"), ("patch", None), ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")), ("act_len", None), ("act_embed", None),
    ("act_mlp", "tensor"),
)


def base() -> ml_collections.ConfigDict:
  """Keys every preset has; presets override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"
  c.model = dict(name="cappa", vocab_size=32_000, max_len=64, patch_size=16, width=768,
                 enc_depth=12, dec_depth=6, mlp_dim=2048, num_heads=12, num_registers=8,
                 remat_policy="none", scan_unroll=1,  # blocks per scan iteration
                 matmul_policy="f32_accum")  # f32_accum | legacy (capjax/models/layers.py)
  c.data = dict(
      name="shapes", dir="", image_size=224, num_threads=2, prefetch=8, num_workers=0,
      resize="center_crop",  # center_crop | letterbox | random_resized_crop (train only)
      lowercase=False, strip_punctuation=False,  # caption cleaning before tokenization
      max_image_pixels=89_478_485,  # decompression-bomb guard (PIL's default)
      shards_format="array_record",  # shards: array_record | tfds
      restval_to_train=True, karpathy_json="")  # coco
  c.tokenizer = dict(path="", model_type="unigram", vocab_size=32_000)
  c.objective = dict(masked_pred_prob=0.75)
  c.train = dict(num_steps=1000, batch_size=64, log_every=50, grad_clip_norm=1.0,
                 nonfinite="skip",  # skip|stop
                 inject_nan_at_step=-1, inject_nan_steps=1,  # fault injection (tests); -1: off
                 max_consecutive_skips=100)  # skip mode stops after this many in a row; 0: never
  c.eval = dict(every=500, num_examples=256, batch_size=64, num_captions=4)
  c.checkpoint = dict(every=500, keep=3, keep_period=0)  # also keep every keep_period-th; 0: off
  c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
  c.schedule = dict(name="warmup_cosine", peak_lr=1e-3, warmup_steps=100, end_lr_fraction=0.01)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding = dict(rules=DEFAULT_SHARDING_RULES)
  c.wandb = dict(mode="offline", project="capjax", name="")
  return c
