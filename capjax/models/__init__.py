"""Model registry: `config.model.name` -> a function building the Flax module from config."""

from capjax.models import cappa

_MODELS = {"cappa": cappa.from_config}


def from_config(config):
  name = config.model.name
  if name not in _MODELS:
    raise ValueError(f"Unknown model.name={name!r}; expected one of {sorted(_MODELS)}.")
  return _MODELS[name](config)
