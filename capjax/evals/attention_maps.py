"""Attention maps of a CapPa caption, as PNGs a person can read.

`weights` runs the model once, teacher-forced on a caption, with the "intermediates"
collection mutable: `layers.Attention` then sows its weights (and costs nothing extra when
it is not). Two kinds of map are drawn over the image:
  * words: for each generated token, the cross-attention of the decoder's last layer over
    the image patches at the step that generated it, averaged over heads (the last layer's
    maps follow the named object more closely than the first's in shapes_tiny); the title is
    the token and the share of attention that went to the registers instead. One colour
    scale for all the words of an image, so a diffuse map looks dim, not alarming.
  * registers: each register's attention over the patches in the encoder's last layer, the
    mean over heads and each head (each panel its own scale), with the share that went to
    patches rather than to other registers.
Maps are drawn one cell a patch over the image in grey (its colours cannot be mistaken for
the map's), with matplotlib's Agg canvas (no display, no global backend change).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from capjax import objectives
from capjax.tasks import base


@functools.partial(jax.jit, static_argnames=("model", "dtype", "bos"))
def weights(model, params, images_uint8, tokens_BxL, *, dtype, bos: int):
  """(cross float32[layers, B, heads, L, T]: the decoder's cross-attention at the step that
  generated each of `tokens`; encoder float32[B, heads, T, T]: the encoder's last layer).
  T = registers + patches."""
  b, length = tokens_BxL.shape
  inputs_BxL = jnp.concatenate([jnp.full((b, 1), bos, jnp.int32), tokens_BxL[:, :-1]], axis=1)
  _, state = model.apply({"params": params}, base.normalize_images(images_uint8, dtype),
                         inputs_BxL, objectives.causal_mask(length)[None, None],
                         mutable=["intermediates"])
  found = state["intermediates"]
  cross = found["decoder"]["layers"]["cross_attention"]["attention_weights"][0]
  encoder = found["encoder"]["layers"]["attention"]["attention_weights"][0]
  return cross.astype(jnp.float32), encoder[-1].astype(jnp.float32)


def over_patches(weights_XxT, num_registers: int):
  """(maps float[X, G, G] over the patch grid, share of each row's attention on registers)."""
  patches_XxN = weights_XxT[:, num_registers:]
  grid = int(round(patches_XxN.shape[1] ** 0.5))
  assert grid * grid == patches_XxN.shape[1], patches_XxN.shape
  return (patches_XxN.reshape(-1, grid, grid),
          weights_XxT[:, :num_registers].sum(axis=1))


def _overlay(ax, image_HxWx3, map_GxG, title: str, vmax: float | None = None):
  h, w = image_HxWx3.shape[:2]
  ax.imshow(image_HxWx3.mean(-1), cmap="gray", vmin=0, vmax=255)
  vmax = float(map_GxG.max()) if vmax is None else vmax
  ax.imshow(map_GxG, cmap="turbo", alpha=0.5, extent=(0, w, h, 0), interpolation="nearest",
            vmin=0, vmax=max(vmax, 1e-12))
  ax.set_title(title, fontsize=10)
  ax.set_axis_off()


def _image(ax, image_HxWx3):
  ax.imshow(image_HxWx3)
  ax.set_title("image", fontsize=10)
  ax.set_axis_off()


def _save(fig: Figure, path: str):
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100, bbox_inches="tight")


def _file_word(word: str) -> str:
  return re.sub(r"[^\w-]+", "_", word).strip("_")[:40] or "token"


def write(directory: str, image_HxWx3: np.ndarray, words: list[str], cross_LxT: np.ndarray,
          registers_HxTxT: np.ndarray, num_registers: int) -> list[str]:
  """Writes NN_WORD.png for each word (row of `cross`), words.png (all of them) and
  registers.png into `directory`; returns the paths written."""
  os.makedirs(directory, exist_ok=True)
  written = []
  maps_LxGxG, register_share_L = over_patches(cross_LxT[:len(words)], num_registers)
  titles = [f"{w}\n(registers {s:.0%})" for w, s in zip(words, register_share_L)]
  vmax = float(maps_LxGxG.max()) if words else None
  for i, (word, title, map_GxG) in enumerate(zip(words, titles, maps_LxGxG)):
    fig = Figure(figsize=(3, 3.3))
    _overlay(fig.add_subplot(), image_HxWx3, map_GxG, title, vmax)
    written.append(os.path.join(directory, f"{i:02d}_{_file_word(word)}.png"))
    _save(fig, written[-1])
  if words:
    cols = min(len(words) + 1, 6)
    rows = -(-(len(words) + 1) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows))
    _image(fig.add_subplot(rows, cols, 1), image_HxWx3)
    for i, (title, map_GxG) in enumerate(zip(titles, maps_LxGxG)):
      _overlay(fig.add_subplot(rows, cols, i + 2), image_HxWx3, map_GxG, title, vmax)
    fig.suptitle("decoder cross-attention per word (last layer, mean of heads)")
    written.append(os.path.join(directory, "words.png"))
    _save(fig, written[-1])
  if num_registers:
    heads = registers_HxTxT.shape[0]
    fig = Figure(figsize=(2.2 * (heads + 1), 2.6 * num_registers))
    for r in range(num_registers):
      per_head = [registers_HxTxT.mean(0)[r]] + [registers_HxTxT[h, r] for h in range(heads)]
      for c, row_T in enumerate(per_head):
        map_GxG = over_patches(row_T[None], num_registers)[0][0]
        title = (f"register {r}, " + ("mean of heads" if c == 0 else f"head {c}")
                 + f"\n(patches {float(map_GxG.sum()):.0%})")
        _overlay(fig.add_subplot(num_registers, heads + 1, r * (heads + 1) + c + 1),
                 image_HxWx3, map_GxG, title)
    fig.suptitle("registers' attention over the patches (encoder's last layer)")
    written.append(os.path.join(directory, "registers.png"))
    _save(fig, written[-1])
  return written
