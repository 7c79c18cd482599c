"""Does the input pipeline keep up with the flickr_small train step on this machine?

  python bench/data.py [--num_images=200] [--steps=6] [--workers=2]

Writes a temporary Flickr8k folder (Kaggle layout) of photo-like 500x375 JPEGs
and measures, in one run:
  decode          `source[i]`: file read, JPEG decode, RGB (one thread)
  + augment       + caption cleaning, resize (each `data.resize` mode), tokenize
  pipeline        `pipeline.train_dataset` batches of 64 with flickr_small's
                  settings (grain read threads), and with `--workers` processes
  train step      the jitted flickr_small train step (batch 64), as train.py
                  builds it, on a fixed batch and fed by the live pipeline
The ratio is pipeline batches/s / train steps/s (>= 1: the pipeline keeps up).
The pipeline and the step are timed apart, each with the whole machine; the
"fed by the pipeline" row shares it, as training does. The last line is
`RESULT data_images_per_s=... step_images_per_s=... ratio=...`.
"""

import argparse
import csv
import os
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from capjax import config as config_lib, setup as setup_lib
from capjax.data import pipeline, registry, tokenizer as tokenizer_lib, transforms

WIDTH, HEIGHT = 500, 375  # the usual Flickr8k size
WORDS = ("a dog runs through the grass . two children play on a beach near the water ; "
         "a man in a red shirt climbs a rock while people watch from the snow").split()


def photo_like(rng: np.random.Generator) -> np.ndarray:
  """Smooth colour fields plus grain: JPEG sizes and decode costs like photos (~70 KB)."""
  low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(low).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC),
                     dtype=np.float32)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def make_folder(root: str, num_images: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "Images"))
  with open(os.path.join(root, "captions.txt"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    for i in range(num_images):
      name = f"{i:06d}.jpg"
      Image.fromarray(photo_like(rng)).save(os.path.join(root, "Images", name), quality=90)
      for _ in range(5):
        writer.writerow([name, " ".join(rng.choice(WORDS, rng.integers(6, 14))).capitalize()])


def timed(fn, repeats: int = 1) -> float:
  """Seconds per call of `fn` (after one warm-up call)."""
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def per_image_rates(config, tok) -> list[tuple[str, float]]:
  """(row name, images/s) of decode and decode + augment, one thread, this process."""
  source = registry.get_source(config.data, "train")
  n = len(source)
  rows = [("decode (read + JPEG + RGB)",
           n / timed(lambda: [source[i] for i in range(n)]))]
  records = [source[i] for i in range(n)]
  decode_s = n / rows[0][1]
  for mode in transforms.RESIZE_MODES:
    config.data.resize = mode
    preprocess = pipeline.Preprocess.from_config(config)
    rng = np.random.default_rng(0)
    augment_s = timed(lambda: [pipeline.make_example(r, tok, preprocess, rng) for r in records])
    rows.append((f"decode + augment ({mode})", n / (decode_s + augment_s)))
  config.data.resize = "center_crop"
  return rows


def pipeline_rate(config, tok_path: str, num_batches: int) -> float:
  """Images/s of `train_dataset` batches, after a warm-up that drains the start-up buffers."""
  it = iter(pipeline.train_dataset(config, tok_path))
  for _ in range(1 + 2 * max(1, config.data.num_workers)):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - start
  getattr(it, "close", lambda: None)()
  return num_batches * config.train.batch_size / seconds


def train_step_rates(config, tok, tok_path: str, steps: int) -> tuple[float, float, float]:
  """(compile s, images/s on a fixed batch, images/s fed by the live pipeline)."""
  run_setup = setup_lib.assemble(config, tok.special)
  it = iter(pipeline.train_dataset(config, tok_path))
  state = run_setup.init_state()
  with run_setup.context():
    step = run_setup.train_step
    batch = run_setup.global_batch(next(it))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    def run(feed):
      nonlocal state
      start = time.perf_counter()
      for _ in range(steps):
        state, out = step(state, feed())
      jax.block_until_ready(out)
      return steps * config.train.batch_size / (time.perf_counter() - start)

    fixed = run(lambda: batch)
    fed = run(lambda: run_setup.global_batch(next(it)))
  return compile_s, fixed, fed


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=200)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args(argv)
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory(prefix="capjax-bench-data-") as tmp:
    data_dir = os.path.join(tmp, "flickr8k")
    make_folder(data_dir, args.num_images)
    config = config_lib.load("flickr_small", [f"--config.data.dir={data_dir}"])
    tok_path = os.path.join(tmp, "tokenizer.model")
    tok = tokenizer_lib.train(pipeline.training_captions(config), tok_path,
                              config.tokenizer.vocab_size, config.tokenizer.model_type)
    batch = config.train.batch_size
    rows = per_image_rates(config, tok)
    num_batches = max(4, 3 * args.num_images // batch)
    threads = config.data.num_threads
    data_rate = pipeline_rate(config, tok_path, num_batches)
    rows.append((f"pipeline, {threads} read threads (flickr_small)", data_rate))
    if args.workers:
      config.data.num_workers = args.workers
      rows.append((f"pipeline, {args.workers} worker processes",
                   pipeline_rate(config, tok_path, num_batches)))
      config.data.num_workers = 0
    compile_s, step_rate, fed_rate = train_step_rates(config, tok, tok_path, args.steps)
    rows.append((f"train step, fixed batch ({config.dtype}, compile {compile_s:.0f} s)",
                 step_rate))
    rows.append(("train step fed by the pipeline", fed_rate))

  print(f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs; "
        f"{args.num_images} JPEGs {WIDTH}x{HEIGHT} -> {config.data.image_size}px, batch {batch}")
  print(f"{'stage':<58} {'images/s':>9} {'batches/s':>10}")
  for name, rate in rows:
    print(f"{name:<58} {rate:>9.1f} {rate / batch:>10.2f}")
  ratio = data_rate / step_rate
  verdict = "keeps up" if ratio >= 1 else "is the bottleneck"
  print(f"pipeline batches/s / train steps/s = {ratio:.2f}: the pipeline {verdict}")
  print(f"RESULT data_images_per_s={data_rate:.1f} step_images_per_s={step_rate:.1f} "
        f"ratio={ratio:.2f}")


if __name__ == "__main__":
  main(sys.argv[1:])
