"""Draw the loss curves of a run: `python tools/plot_metrics.py DIR [--output=PNG]`.

Reads DIR/metrics.jsonl and writes DIR/loss.png (train/loss and val/loss against step).
DIR may be gs:// (through epath).
"""

import argparse
import io
import json
import sys

from etils import epath
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_series(path, keys=("train/loss", "val/loss")) -> dict[str, list[tuple[int, float]]]:
  series = {k: [] for k in keys}
  with epath.Path(path).open() as f:
    for line in f:
      row = json.loads(line)
      for k in keys:
        if k in row:
          series[k].append((row["step"], row[k]))
  return series


def plot(series: dict, output):
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, points in series.items():
    if points:
      steps, values = zip(*sorted(points))
      ax.plot(steps, values, marker="o" if name.startswith("val") else None, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  epath.Path(output).write_bytes(png.getvalue())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  path = epath.Path(args.workdir) / "metrics.jsonl"
  if not path.exists():
    sys.exit(f"error: no {path}; train first with python -m capjax.train --workdir={args.workdir}")
  output = args.output or epath.Path(args.workdir) / "loss.png"
  plot(read_series(path), output)
  print(output)


if __name__ == "__main__":
  main()
