"""Registry of caption data sources, looked up by `config.data.name`.

A source is a random-access sequence (grain's `RandomAccessDataSource` protocol:
`__len__`, `__getitem__`) of records `{"image": uint8[H, W, 3], "captions": list[str]}`
plus optional extra keys (e.g. `"attributes"`). A source may return `None` for an
item it could not read; the pipeline skips and counts those.
"""

from typing import Callable, Protocol

import ml_collections


class CaptionSource(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict | None: ...


SourceFactory = Callable[[ml_collections.ConfigDict, str], CaptionSource]
_SOURCES: dict[str, SourceFactory] = {}


def register(name: str):
  """Decorator: `@register("flickr8k") def make(data_config, split) -> source`."""
  def wrap(factory: SourceFactory) -> SourceFactory:
    _SOURCES[name] = factory
    return factory
  return wrap


def get_source(data_config: ml_collections.ConfigDict, split: str) -> CaptionSource:
  # Importing the modules fills the registry.
  from capjax.data import sources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  if data_config.name not in _SOURCES:
    raise ValueError(
        f"Unknown data.name={data_config.name!r}; expected one of {sorted(_SOURCES)}.")
  return _SOURCES[data_config.name](data_config, split)
