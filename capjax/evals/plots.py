"""PNG plots of the representation evals (matplotlib, Agg: no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ENCODER_STYLES = {"trained": dict(color="tab:blue"), "random": dict(color="tab:gray", ls="--")}


def _save(fig, path: str) -> None:
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def probe_accuracy(results: dict, shots, path: str) -> None:
  """One panel per label set: ridge accuracy against shots per class (and the full train
  split, "all"), the logistic probe as a point at "all", trained vs random, chance dotted."""
  names = list(results)
  fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.6 * max(len(names), 1), 3.2),
                           squeeze=False)
  x = list(range(len(shots) + 1))
  for ax, name in zip(axes[0], names):
    row = results[name]
    for encoder, style in ENCODER_STYLES.items():
      if encoder not in row:
        continue
      accs = [row[encoder][f"{k}shot"] for k in shots] + [row[encoder]["full"]]
      ax.plot(x, accs, marker="o", label=f"{encoder} ridge", **style)
      ax.plot([x[-1]], [row[encoder]["logistic"]], marker="x", ms=9, ls="none",
              color=style["color"], label=f"{encoder} logistic")
    ax.axhline(row["chance"], color="k", ls=":", lw=1, label="chance")
    ax.set_xticks(x, [str(k) for k in shots] + ["all"])
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{name} ({row['classes']} classes)")
    ax.set_xlabel("train images per class")
  axes[0][0].set_ylabel("test top-1")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  _save(fig, path)


def category_accuracy(results: dict, path: str) -> None:
  """Grouped bars per category: accuracy of every (encoder, score) pair; 50% dotted."""
  categories = list(next(iter(results.values())))
  series = [(encoder, score) for encoder in results for score in ("likelihood", "normalized")
            if score in next(iter(results[encoder].values()))]
  width = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(1.3 * len(categories) + 3, 3.4))
  colours = {("trained", "likelihood"): "tab:cyan", ("trained", "normalized"): "tab:blue",
             ("random", "likelihood"): "lightgray", ("random", "normalized"): "tab:gray"}
  for i, (encoder, score) in enumerate(series):
    heights = [results[encoder][c][score] for c in categories]
    ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))], heights,
           width, label=f"{encoder}, {score}", color=colours.get((encoder, score)))
  ax.axhline(0.5, color="k", ls=":", lw=1)
  ax.set_xticks(range(len(categories)), categories, rotation=20)
  ax.set_ylim(0, 1.02)
  ax.set_ylabel("accuracy (positive wins)")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  _save(fig, path)
