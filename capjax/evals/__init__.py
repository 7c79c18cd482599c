"""Evaluator registry: `--eval=NAME` -> function(trained, args) -> dict of metrics."""

_EVALS = {}


def register(name):
  def wrap(fn):
    _EVALS[name] = fn
    return fn
  return wrap


def get(name):
  from capjax.evals import attributes  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  if name not in _EVALS:
    raise ValueError(f"Unknown --eval={name!r}; expected one of {sorted(_EVALS)}.")
  return _EVALS[name]
