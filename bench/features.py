"""How much faster a prefix captioner trains from stored frozen-tower features than by running
the tower every step (seed 002's practice), measured in one run.

  python bench/features.py [--config=clip_prefix_small] [--num_images=512] [--steps=30] \
      [--config.KEY=VALUE ...]

Stores the features of the first `--num_images` training images (tools/precompute_features.py)
in a temporary folder, then times the jitted train step as train.py builds and feeds it: from
the images pipeline (the tower runs in the step) and from the features pipeline
(`data.features`), `--steps` steps each after two warm-up steps. The ratio is features steps/s
over images steps/s; the last line is `RESULT images_per_s=... features_per_s=... ratio=...`.
Storing costs one tower pass per image, once.
"""

import argparse
import os
import sys
import tempfile
import time

from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from capjax import config as config_lib, setup as setup_lib
from capjax.data import pipeline, tokenizer as tokenizer_lib
from tools import precompute_features


def steps_per_s(config, tok, steps: int) -> float:
  """Train steps/s fed by the live pipeline (after two warm-up steps that compile)."""
  run = setup_lib.assemble(config, tok.special)
  it = iter(pipeline.train_dataset(config, tok.path))
  with run.context():
    state = run.init_state()
    for _ in range(2):
      state, metrics = run.train_step(state, run.global_batch(next(it)))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = run.train_step(state, run.global_batch(next(it)))
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - start)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="clip_prefix_small")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--steps", type=int, default=30)
  args, overrides = parser.parse_known_args(argv)
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory(prefix="capjax-bench-features-") as tmp:
    workdir, output = os.path.join(tmp, "run"), os.path.join(tmp, "features")
    config = config_lib.load(args.config, overrides)
    start = time.perf_counter()
    precompute_features.precompute(config, workdir, "train", output, args.num_images)
    store_s = time.perf_counter() - start
    tok = tokenizer_lib.train(pipeline.training_captions(config),
                              os.path.join(tmp, "tokenizer.model"),
                              config.tokenizer.vocab_size, config.tokenizer.model_type)
    images_rate = steps_per_s(config, tok, args.steps)
    stored = config_lib.load(args.config, overrides + [f"--config.data.features={output}"])
    features_rate = steps_per_s(stored, tok, args.steps)
  batch = config.train.batch_size
  print(f"{args.config}: {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} CPUs, batch {batch}, {config.dtype}")
  print(f"{'train step fed by':<40} {'steps/s':>8} {'images/s':>9}")
  for name, rate in (("images (frozen tower in the step)", images_rate),
                     ("stored features (data.features)", features_rate)):
    print(f"{name:<40} {rate:>8.2f} {rate * batch:>9.1f}")
  print(f"storing {args.num_images} images' features (compile included): {store_s:.1f} s")
  ratio = features_rate / images_rate
  print(f"features / images = {ratio:.2f}x")
  print(f"RESULT images_per_s={images_rate * batch:.1f} "
        f"features_per_s={features_rate * batch:.1f} ratio={ratio:.2f}")


if __name__ == "__main__":
  main(sys.argv[1:])
