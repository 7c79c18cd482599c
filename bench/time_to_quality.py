"""Time to a good captioner: recipes trained back to back, quality against wall time and steps.

  .venv/bin/python bench/time_to_quality.py --config=shapes_tiny [--candidates=a,b,c]
      [--eval_every=100] [--target=0.8] [--png=PATH] [--workdir=DIR] [--set KEY=VALUE ...]
  .venv/bin/python bench/time_to_quality.py --config=flickr_small [--images=2000]

Each candidate is the preset with a few config overrides (CANDIDATES; `--list` prints them). It
trains through `capjax.train.train` in this process, one after the other, from the same seed,
with an evaluator every `--eval_every` steps: attribute accuracy of greedy captions on 256 `val`
images for shapes_tiny, validation loss and CIDEr on a Flickr8k-layout folder the bench writes
(shapes scenes saved as JPEG, five captions each, decoded back by the Flickr8k reader) for
flickr_small. Wall time is training time as the trainer's log windows measure it (compiles and
input included, evaluations left out), so it is the time a user of the recipe waits.

The table gives each candidate's curve; the PNG plots them against seconds and steps. The last
line gives, per candidate, the seconds to first reach the target (`--target`; default 0.8
attribute accuracy, or the first candidate's best validation loss on Flickr) and that time as a
ratio to the first candidate's (the reference recipe).
"""

import argparse
import json
import math
import os
import tempfile
import time

from capjax import config as config_lib, train as train_lib

# Candidates per preset: {name: overrides}. DEFAULT: the ones a plain run trains (the first is
# the reference of the ratios); `--candidates=all` trains every one.
SHAMPOO = {"optimizer.name": "shampoo", "optimizer.b2": 0.9, "optimizer.block_size": 128,
           "optimizer.merge_small_dims_block_size": 128, "optimizer.start_preconditioning_step": 21,
           "optimizer.preconditioning_compute_steps": 20}  # as bench/optimizers.py


def _recipe(optimizer: str, lr: float, batch: int, steps: int, **more) -> dict:
  # b2 0.999 (capjax's default) for the others: what they were measured with, whatever the
  # preset now says.
  base = SHAMPOO if optimizer == "shampoo" else {"optimizer.name": optimizer, "optimizer.b2": 0.999}
  return {**base, "schedule.peak_lr": lr, "train.batch_size": batch, "train.num_steps": steps,
          **more}


CANDIDATES = {
    "shapes_tiny": {
        # The demo recipe before issue 19.
        "adamw_2e-3_b64_1500": _recipe("adamw", 2e-3, 64, 1500),
        "adamw_3e-3_b64_1500": _recipe("adamw", 3e-3, 64, 1500),
        "adamw_4e-3_b64_1500": _recipe("adamw", 4e-3, 64, 1500),
        "adamw_3e-3_b64_1000": _recipe("adamw", 3e-3, 64, 1000),
        "adamw_2e-3_b32_2000": _recipe("adamw", 2e-3, 32, 2000),
        "adamw_3e-3_b32_1500": _recipe("adamw", 3e-3, 32, 1500),
        "adamw_2e-3_b64_1500_mask0.25": _recipe("adamw", 2e-3, 64, 1500,
                                                **{"objective.masked_pred_prob": 0.25}),
        "adafactor_1e-2_b64_1500": _recipe("adafactor", 1e-2, 64, 1500),
        "shampoo_1.4e-4_b64_1000": _recipe("shampoo", 1.4e-4, 64, 1000),
        "shampoo_2e-4_b64_1000": _recipe("shampoo", 2e-4, 64, 1000),
        "shampoo_2e-4_b64_700": _recipe("shampoo", 2e-4, 64, 700),
        "shampoo_1.4e-4_b64_1500": _recipe("shampoo", 1.4e-4, 64, 1500),
        "shampoo_1e-4_b32_1500": _recipe("shampoo", 1e-4, 32, 1500),
    },
    # On a small folder (--images) the preset's 6000 steps would be hundreds of epochs: 3000.
    "flickr_small": {
        # Seed 000's recipe (the preset before issue 19).
        "adamw_1e-3_mask0.75_3000": _recipe("adamw", 1e-3, 64, 3000),
        "adamw_2e-3_mask0.75_3000": _recipe("adamw", 2e-3, 64, 3000),
        "adamw_1e-3_mask0.5_3000": _recipe("adamw", 1e-3, 64, 3000,
                                           **{"objective.masked_pred_prob": 0.5}),
        "shampoo_1.4e-4_mask0.75_3000": _recipe("shampoo", 1.4e-4, 64, 3000),
        "shampoo_2e-4_mask0.75_3000": _recipe("shampoo", 2e-4, 64, 3000),
    },
}
DEFAULT = {"shapes_tiny": ["adamw_2e-3_b64_1500", "shampoo_2e-4_b64_1000",
                           "shampoo_2e-4_b64_700"],
           "flickr_small": list(CANDIDATES["flickr_small"])}
FLICKR_FOLDER_CAPTIONS = 5


def write_flickr_folder(directory: str, num_images: int, image_size: int) -> str:
  """A Flickr8k folder in the Kaggle layout (Images/*.jpg, captions.txt) of shapes scenes."""
  import csv  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from capjax.data import synthetic  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(directory, "Images"), exist_ok=True)
  source = synthetic.ShapesSource("train", num_images, image_size)
  with open(os.path.join(directory, "captions.txt"), "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["image", "caption"])
    for i in range(num_images):
      record = source[i]
      name = f"{i:05d}.jpg"
      Image.fromarray(record["image"]).save(os.path.join(directory, "Images", name), quality=90)
      captions = (record["captions"] * FLICKR_FOLDER_CAPTIONS)[:FLICKR_FOLDER_CAPTIONS]
      rows.writerows([name, c] for c in captions)
  return directory


# Per preset: (metric key in metrics.jsonl, "max" or "min", the evaluator and its options).
QUALITY = {
    "shapes_tiny": ("eval/attributes/attribute_accuracy", "max",
                    ("attributes", {"split": "val", "num_examples": 256, "show": 0})),
    "flickr_small": ("val/loss", "min",
                     ("captioning", {"split": "val", "num_examples": 128, "show": 0})),
}


def candidate_config(preset: str, overrides: dict, extra: list[str], eval_every: int,
                     data_dir: str | None):
  flags = [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra)
  if data_dir:
    flags.append(f"--config.data.dir={data_dir}")
  _, _, (evaluator, options) = QUALITY[preset]
  flags += [f"--config.evals.{evaluator}.every={eval_every}"]
  flags += [f"--config.evals.{evaluator}.{k}={v}" for k, v in options.items()]
  flags += ["--config.wandb.mode=disabled", f"--config.train.log_every={eval_every}",
            f"--config.eval.every={eval_every}", "--config.eval.num_captions=0",
            "--config.checkpoint.every=0"]
  return config_lib.load(preset, flags)


def train_time_curve(metrics_path: str, key: str) -> list[dict]:
  """[{step, seconds, value}] at each step where `key` was written; seconds are training time:
  the sum of the log windows' step time (each window starts after the previous evaluation)."""
  rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
  curve, seconds, last_step, other = [], 0.0, 0, {}
  for row in rows:
    if "perf/step_time_s" in row:
      seconds += row["perf/step_time_s"] * (row["step"] - last_step)
      last_step = row["step"]
    for k, v in row.items():
      if k not in ("step",) and (k.startswith("eval/") or k.startswith("val/")):
        other.setdefault(row["step"], {})[k] = v
    if key in row:
      curve.append({"step": row["step"], "seconds": seconds, "value": row[key]})
  for point in curve:
    point["others"] = other.get(point["step"], {})
  return curve


def first_reaching(curve: list[dict], target: float, direction: str):
  for point in curve:
    if (point["value"] >= target) if direction == "max" else (point["value"] <= target):
      return point
  return None


def plot(curves: dict, key: str, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4))
  for name, curve in curves.items():
    by_time.plot([p["seconds"] for p in curve], [p["value"] for p in curve], marker=".",
                 label=name)
    by_step.plot([p["step"] for p in curve], [p["value"] for p in curve], marker=".",
                 label=name)
  by_time.set_xlabel("training wall time (s)")
  by_step.set_xlabel("step")
  for ax in (by_time, by_step):
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="shapes_tiny", choices=sorted(CANDIDATES))
  parser.add_argument("--candidates", default=None, help="comma-separated, or all; default: DEFAULT")
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--target", type=float, default=None)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every candidate (e.g. data.num_threads=8)")
  parser.add_argument("--images", type=int, default=2000, help="Flickr folder size")
  parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
  parser.add_argument("--png", default=None, help="default: WORKDIR/time_to_quality.png")
  parser.add_argument("--list", action="store_true")
  args = parser.parse_args()
  table = CANDIDATES[args.config]
  names = (list(table) if args.candidates == "all" else
           args.candidates.split(",") if args.candidates else DEFAULT[args.config])
  unknown = [n for n in names if n not in table]
  if unknown or args.list:
    for name, overrides in table.items():
      print(f"{name}: {overrides}")
    if unknown:
      raise SystemExit(f"error: unknown candidate(s) {unknown} for {args.config}")
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix="time_to_quality_")
  extra = [f"--config.{s}" for s in args.set]
  data_dir = None
  if args.config.startswith("flickr"):
    data_dir = write_flickr_folder(os.path.join(workdir, "flickr_folder"), args.images,
                                   config_lib.load(args.config).data.image_size)
  began = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - began:6.0f} s] {msg}", flush=True)

  key, direction, _ = QUALITY[args.config]
  curves = {}
  for name in names:
    config = candidate_config(args.config, table[name], extra, args.eval_every, data_dir)
    run_dir = os.path.join(workdir, name)
    log(f"{name}: {table[name] or 'the preset'} ({config.train.num_steps} steps)")
    _, stopped_by = train_lib.train(config, run_dir)
    if stopped_by:
      raise SystemExit(f"stopped by {stopped_by} during {name}; its run is in {run_dir}")
    curves[name] = train_time_curve(os.path.join(run_dir, "metrics.jsonl"), key)
    for p in curves[name]:
      others = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in sorted(p["others"].items())
                        if k != key and isinstance(v, (int, float)))
      log(f"  {name} step {p['step']:5d}  {p['seconds']:7.1f} s  {key} {p['value']:.4f}  {others}")

  target = args.target
  if target is None:
    target = 0.8 if direction == "max" else min(p["value"] for p in curves[names[0]])
  print(f"\n{'candidate':28s} {'best':>8s} {'final':>8s} {'steps':>6s} {'train s':>8s} "
        f"{'to target':>10s}")
  reached = {}
  for name, curve in curves.items():
    best = (max if direction == "max" else min)(p["value"] for p in curve)
    hit = first_reaching(curve, target, direction)
    reached[name] = hit
    to_target = f"{hit['seconds']:.0f} s" if hit else "never"
    print(f"{name:28s} {best:8.4f} {curve[-1]['value']:8.4f} {curve[-1]['step']:6d} "
          f"{curve[-1]['seconds']:8.1f} {to_target:>10s}")
  png = args.png or os.path.join(workdir, "time_to_quality.png")
  plot(curves, key, png)
  print(f"curves: {png}")
  reference = reached[names[0]]
  parts = []
  for name, hit in reached.items():
    if hit is None:
      parts.append(f"{name}=never")
    else:
      ratio = hit["seconds"] / reference["seconds"] if reference else math.nan
      parts.append(f"{name}={hit['seconds']:.0f}s/{ratio:.2f}x")
  print(f"RESULT target {key}{'>=' if direction == 'max' else '<='}{target:.4g}: "
        + " ".join(parts))


if __name__ == "__main__":
  main()
