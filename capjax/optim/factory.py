"""Optimizers by name (`config.optimizer.name`), each reading its own `optimizer.*` keys."""

import optax

from capjax.optim import schedules

_OPTIMIZERS = {}


def register(name):
  def wrap(fn):
    _OPTIMIZERS[name] = fn
    return fn
  return wrap


@register("adamw")
def adamw(opt_config, learning_rate):
  return optax.adamw(learning_rate, b1=opt_config.get("b1", 0.9), b2=opt_config.get("b2", 0.999),
                     eps=opt_config.get("eps", 1e-8),
                     weight_decay=opt_config.get("weight_decay", 0.0))


@register("adafactor")
def adafactor(opt_config, learning_rate):
  return optax.adafactor(learning_rate, weight_decay_rate=opt_config.get("weight_decay") or None)


def make_optimizer(config) -> optax.GradientTransformation:
  name = config.optimizer.name
  if name not in _OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name={name!r}; expected one of {sorted(_OPTIMIZERS)}.")
  tx = _OPTIMIZERS[name](config.optimizer, schedules.get_schedule(config))
  clip = config.train.get("grad_clip_norm", 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
