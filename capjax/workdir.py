"""A run directory's layout, joined one way (`etils.epath`: local paths and gs:// alike).

  DIR/checkpoints/      orbax checkpoints (checkpoint.py)
  DIR/tokenizer.model   the tokenizer, trained on first use unless `tokenizer.path` is set
  DIR/metrics.jsonl     one JSON object a logged step (metrics_log.py)

An export (`tools/export.py`, `trained.export`) is a directory of its own:
  OUT/params/           the params (orbax), nothing else
  OUT/config.json       the training config
  OUT/tokenizer.model   the tokenizer
  OUT/export.json       {"format", "step", "source"}
"""

from etils import epath

TOKENIZER = "tokenizer.model"


def path(directory) -> epath.Path:
  """`directory` as an epath: absolute when local, as given for gs:// and other stores."""
  p = epath.Path(directory)
  return p if "://" in str(directory) else p.absolute()


def checkpoints(workdir) -> epath.Path:
  return path(workdir) / "checkpoints"


def tokenizer(workdir, config=None) -> epath.Path:
  """`config.tokenizer.path` when set, else DIR/tokenizer.model."""
  if config is not None and config.tokenizer.path:
    return path(config.tokenizer.path)
  return path(workdir) / TOKENIZER


def metrics(workdir) -> epath.Path:
  return path(workdir) / "metrics.jsonl"


def export_params(out) -> epath.Path:
  return path(out) / "params"


def export_config(out) -> epath.Path:
  return path(out) / "config.json"


def export_info(out) -> epath.Path:
  return path(out) / "export.json"


def is_export(directory) -> bool:
  return export_info(directory).exists()
