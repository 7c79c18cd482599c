"""Where metrics go: DIR/metrics.jsonl (one JSON object a line), wandb (offline by default),
and a console progress bar. Only process 0 writes."""

import json
import math
import os
import sys

import jax
import tqdm


def _plain(v):
  v = jax.device_get(v)
  return float(v) if hasattr(v, "__float__") else v


def drop_rows_after(path: str, step: int):
  """Removes rows past `step` (the resumed checkpoint's): a crashed run wrote them, and the
  resumed run writes those steps again."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) < len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsWriter:

  def __init__(self, workdir: str, config, total_steps: int, initial_step: int = 0):
    self.main = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.run = None
    self.bar = None
    if not self.main:
      return
    os.makedirs(workdir, exist_ok=True)
    drop_rows_after(self.path, initial_step)
    mode = os.environ.get("WANDB_MODE", config.wandb.mode)
    if mode != "disabled":
      import wandb  # pylint: disable=g-import-not-at-top
      self.run = wandb.init(
          project=config.wandb.project, name=config.wandb.name or None, mode=mode,
          dir=workdir, config=config.to_dict(), resume="allow",
          settings=wandb.Settings(silent=True))
    self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, file=sys.stderr,
                         dynamic_ncols=True, desc="train")

  def write(self, step: int, metrics: dict):
    if not self.main:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.run is not None:
      self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

  def progress(self, step: int, metrics: dict):
    if self.bar is None:
      return
    self.bar.n = int(step)
    shown = {"loss": metrics.get("train/loss"), "ex/s": metrics.get("perf/examples_per_s"),
             "mfu": metrics.get("perf/mfu")}
    self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()
                          if v is not None and math.isfinite(v)}, refresh=True)

  def message(self, text: str):
    if self.main:
      (self.bar.write if self.bar else print)(text, file=sys.stderr)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.run is not None:
      self.run.finish()
