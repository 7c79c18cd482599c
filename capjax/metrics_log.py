"""Where metrics go: DIR/metrics.jsonl (one JSON object a line), wandb (offline by default),
and the console: a progress bar on a terminal, a plain line per logged step otherwise (a log
file would get a redrawn bar around every message). Only process 0 writes. DIR may be gs://
(through epath)."""

import json
import math
import os
import sys

from etils import epath
import jax
import tqdm

from capjax import workdir as workdir_lib

# wandb's offline files need a local directory; with a gs:// workdir they go here.
LOCAL_WANDB_DIR = os.path.expanduser("~/.cache/capjax")


def _plain(v):
  v = jax.device_get(v)
  return float(v) if hasattr(v, "__float__") else v


def is_local(path) -> bool:
  return "://" not in str(path)


def _replace_contents(path: epath.Path, lines: list[str]):
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(lines))
  tmp.replace(path)


def _step_of(line: str):
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return None  # blank, or torn by a crash in the middle of a write


def rows_up_to(path: epath.Path, step: int) -> list[str]:
  """The file's lines up to `step` (the resumed checkpoint's); rows past it, which a crashed
  run wrote and the resumed run writes again, are removed from the file."""
  if not path.exists():
    return []
  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
  if len(kept) < len(lines):
    _replace_contents(path, kept)
  return kept


class MetricsWriter:

  def __init__(self, workdir: str, config, total_steps: int, initial_step: int = 0):
    self.main = jax.process_index() == 0
    self.path = workdir_lib.metrics(workdir)
    self.run = None
    self.bar = None
    if not self.main:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    # Object stores cannot append: there the whole file is rewritten at each write.
    self.lines = rows_up_to(self.path, initial_step)
    mode = os.environ.get("WANDB_MODE", config.wandb.mode)
    if mode != "disabled":
      import wandb  # pylint: disable=g-import-not-at-top
      wandb_dir = workdir if is_local(workdir) else LOCAL_WANDB_DIR
      os.makedirs(wandb_dir, exist_ok=True)
      self.run = wandb.init(
          project=config.wandb.project, name=config.wandb.name or None, mode=mode,
          dir=wandb_dir, config=config.to_dict(), resume="allow",
          settings=wandb.Settings(silent=True))
    self.total_steps = total_steps
    if sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, file=sys.stderr,
                           dynamic_ncols=True, desc="train")

  def write(self, step: int, metrics: dict):
    if not self.main:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if is_local(self.path):
      with self.path.open("a") as f:
        f.write(line)
    else:
      self.lines.append(line)
      _replace_contents(self.path, self.lines)
    if self.run is not None:
      self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

  def progress(self, step: int, metrics: dict):
    if not self.main:
      return
    shown = {"loss": metrics.get("train/loss"), "ex/s": metrics.get("perf/examples_per_s"),
             "mfu": metrics.get("perf/mfu")}
    shown = {k: f"{v:.3g}" for k, v in shown.items() if v is not None and math.isfinite(v)}
    if self.bar is None:
      print(f"train {int(step)}/{self.total_steps}: "
            + ", ".join(f"{k} {v}" for k, v in shown.items()), file=sys.stderr, flush=True)
      return
    self.bar.n = int(step)
    self.bar.set_postfix(shown, refresh=True)

  def message(self, text: str):
    """Prints `text` (any number of lines) above the progress bar, which is redrawn once."""
    if self.main:
      tqdm.tqdm.write(text, file=sys.stderr)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.run is not None:
      self.run.finish()
