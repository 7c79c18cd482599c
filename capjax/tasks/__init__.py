"""Tasks: everything a model family asks of the framework (see `base.Task`).

`config.task` names one; `get(config, special_ids)` builds it. A new family is a file that
defines a `Task` subclass decorated with `@register("name")`: the loop, the assembly
(`capjax/setup.py`), checkpoints and evals need no edit.
"""

from capjax.config import ConfigError
from capjax.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


def register(name: str):
  def wrap(cls: type[Task]) -> type[Task]:
    _TASKS[name] = cls
    return cls
  return wrap


def _import_builtin():
  # pylint: disable=g-import-not-at-top,unused-import
  from capjax.tasks import cappa, clip_prefix, mini_vlm, siglit  # noqa: F401


def _lookup(name: str) -> type[Task]:
  _import_builtin()
  if name not in _TASKS:
    raise ConfigError(f"Unknown task={name!r}; expected one of {sorted(_TASKS)}.")
  return _TASKS[name]


def check_config(config):
  """The task's own config checks (`Task.check_config`); a `ConfigError` names the key."""
  _lookup(config.task).check_config(config)


def prepare_run(config, workdir: str):
  """The config a run in `workdir` trains with (`Task.prepare_run`)."""
  return _lookup(config.task).prepare_run(config, workdir)


def get(config, special_ids) -> Task:
  """The task `config.task` names, built for `config` and the tokenizer's special ids."""
  return _lookup(config.task)(config, special_ids)
