"""Evaluator registry.

An evaluator is `fn(trained, *, option=default, ...) -> dict` of metrics: it uses only the
trained model's predict functions, tokenizer and config (never a trainer), so the same function
runs standalone (`python -m capjax.evaluate --eval=NAME --option=value`) and during training
(`config.evals`). Its keyword arguments and their defaults are its options.
"""

import importlib
import inspect

from capjax import config as config_lib

# Each registers its evaluators when imported.
_MODULES = ("attributes", "linear_probe", "compositional")
_EVALS = {}


def register(name):
  def wrap(fn):
    _EVALS[name] = fn
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
