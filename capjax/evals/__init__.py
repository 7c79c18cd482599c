"""Evaluator registry.

An evaluator is `fn(trained, *, option=default, ...) -> dict` of metrics: it uses only the
trained model's predict functions, tokenizer and config (never a trainer), so the same function
runs standalone (`python -m capjax.evaluate --eval=NAME --option=value`) and during training
(`config.evals`). Its keyword arguments and their defaults are its options.

`config.evals` maps an evaluator's name to `{"every": N, option: value, ...}`: training runs it
every N steps and at the last step (N = 0: never) and logs its numbers as `eval/NAME/METRIC`.
"""

import importlib
import importlib.util
import inspect
import numbers
import sys

import ml_collections
import tqdm

from capjax import config as config_lib

# Each registers its evaluators when imported.
_MODULES = ("attributes", "captioning", "zeroshot", "linear_probe", "compositional", "siglit")
_EVALS = {}
_REQUIRES = {}


def say(*lines: str):
  """Prints lines to stderr in one write above a training progress bar, which stays one line."""
  tqdm.tqdm.write("\n".join(lines), file=sys.stderr)


def register(name, requires: tuple[str, ...] = ()):
  """`requires`: packages the evaluator imports when it runs (checked at config load)."""
  def wrap(fn):
    _EVALS[name] = fn
    _REQUIRES[name] = tuple(requires)
    return fn
  return wrap


def get(name):
  for module in _MODULES:
    importlib.import_module(f"capjax.evals.{module}")
  if name not in _EVALS:
    raise ValueError(f"Unknown --eval={name!r}; expected one of {sorted(_EVALS)}.")
  return _EVALS[name]


def options(name) -> dict:
  """The evaluator's options and their defaults."""
  params = list(inspect.signature(get(name)).parameters.values())[1:]
  return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def parse_options(name, args: list[str]) -> dict:
  """`--option=value` strings -> {option: value}, typed like the option's default."""
  known, parsed = options(name), {}
  for arg in args:
    if not arg.startswith("--") or "=" not in arg:
      raise ValueError(f"Unrecognized argument {arg!r}; options look like --name=value.")
    key, text = arg[2:].split("=", 1)
    if key not in known:
      raise ValueError(f"--eval={name} has no option --{key}; it takes "
                       f"{', '.join('--' + k for k in known) or 'none'}.")
    parsed[key] = config_lib.parse_value(text, known[key])
  return parsed


def run(name, trained, **option_values) -> dict:
  """The evaluator's metrics; an option it does not take is a one-line ValueError."""
  unknown = sorted(set(option_values) - set(options(name)))
  if unknown:
    raise ValueError(f"--eval={name} has no option {unknown[0]!r}; it takes "
                     f"{sorted(options(name))}.")
  return get(name)(trained, **option_values)


def _check_option(name: str, key: str, value, default):
  if key not in default:
    raise config_lib.ConfigError(
        f"evals.{name}.{key}: --eval={name} has no option {key!r}; it takes {sorted(default)}.")
  expected = default[key]
  if expected is None or isinstance(value, type(expected)):
    return
  if isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool):
    return
  if isinstance(expected, tuple) and isinstance(value, list):
    return
  raise config_lib.ConfigError(f"evals.{name}.{key}={value!r}: expected a "
                               f"{type(expected).__name__} like its default {expected!r}.")


def check_config(config):
  """`config.evals`: known evaluators, an `every` >= 0, options they take, packages they need
  installed; a one-line `ConfigError` naming the key, at config load."""
  for name, entry in (config.get("evals") or {}).items():
    try:
      default = options(name)
    except ValueError as e:
      raise config_lib.ConfigError(f"evals.{name}: {e}") from None
    if not isinstance(entry, (dict, ml_collections.ConfigDict)) or "every" not in entry:
      raise config_lib.ConfigError(
          f"evals.{name} must be a dict with `every` (steps between runs; 0: never) and the "
          f"evaluator's options, got {entry!r}.")
    every = entry["every"]
    if not isinstance(every, int) or isinstance(every, bool):
      raise config_lib.ConfigError(f"evals.{name}.every={every!r}: expected an int.")
    config_lib.check_range(f"evals.{name}.every", every, 0)
    for key, value in entry.items():
      if key != "every":
        _check_option(name, key, value, default)
    for package in _REQUIRES.get(name, ()):
      if importlib.util.find_spec(package) is None:
        raise config_lib.ConfigError(f"evals.{name} needs the {package} package: "
                                     "pip install 'capjax[eval]'.")


def new_entry_default(name: str, key: str):
  """Default of `evals.NAME.KEY` for a `--config.evals.NAME.KEY=V` override: 0 for `every`, the
  evaluator's default for an option; a `ConfigError` for an unknown evaluator or option."""
  try:
    default = options(name)
  except ValueError as e:
    raise config_lib.ConfigError(f"evals.{name}: {e}") from None
  if key != "every" and key not in default:
    raise config_lib.ConfigError(f"evals.{name}.{key}: --eval={name} has no option {key!r}; it "
                                 f"takes {sorted(default)}.")
  return 0 if key == "every" else default[key]


def due(config, step: int) -> list[str]:
  """The configured evaluators to run after `step`."""
  return [name for name, entry in (config.get("evals") or {}).items()
          if entry["every"] > 0 and (step % entry["every"] == 0
                                     or step == config.train.num_steps)]


def run_configured(name: str, trained) -> dict:
  """Runs `config.evals.NAME` on `trained`; its numbers as {"eval/NAME/METRIC": value} (the
  step, text and missing values such as METEOR without Java are left out)."""
  entry = trained.config.evals[name]
  metrics = run(name, trained, **{k: v for k, v in entry.items() if k != "every"})
  return {f"eval/{name}/{k}": v for k, v in metrics.items()
          if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "step"}
