"""Learning-rate schedules by name (`config.schedule.name`)."""

import optax

_SCHEDULES = {}


def register(name):
  def wrap(fn):
    _SCHEDULES[name] = fn
    return fn
  return wrap


@register("warmup_cosine")
def warmup_cosine(schedule_config, num_steps: int):
  warmup = min(schedule_config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=schedule_config.peak_lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=schedule_config.peak_lr * schedule_config.end_lr_fraction)


@register("warmup_rsqrt")
def warmup_rsqrt(schedule_config, num_steps: int):
  del num_steps
  warmup = max(schedule_config.warmup_steps, 1)
  return optax.join_schedules([
      optax.linear_schedule(0.0, schedule_config.peak_lr, warmup),
      lambda step: schedule_config.peak_lr * (warmup / (step + warmup)) ** 0.5,
  ], [warmup])


@register("constant")
def constant(schedule_config, num_steps: int):
  del num_steps
  return optax.constant_schedule(schedule_config.peak_lr)


def get_schedule(config):
  name = config.schedule.name
  if name not in _SCHEDULES:
    raise ValueError(f"Unknown schedule.name={name!r}; expected one of {sorted(_SCHEDULES)}.")
  return _SCHEDULES[name](config.schedule, config.train.num_steps)
