"""Decoding throughput: greedy with and without the KV cache, beam 4, sampling, parallel.

  python bench/decode.py [--config=cappa_bench_cpu] [--batch_size=8] [--new_tokens=64]
      [--rounds=3] [--config.a.b=value ...]

A CapPa of the config's sizes (model.max_len raised to --new_tokens where smaller, random
params with a fan_in vocabulary head) captions a fixed batch of random images, every
decoder generating exactly --new_tokens tokens (min_new_tokens = max_new_tokens: no row
ends early, so every method does the same number of steps). Each method is compiled first,
then timed (best of --rounds); tokens/s counts the returned caption's tokens (B x new_tokens)
whatever the work behind them (beam 4 runs 4 rows an image). The ratios are measured in one
run. The last line is machine-readable:
  RESULT cache_speedup=<cached / recompute greedy> greedy_tok_s=<float>
      recompute_tok_s=<float> beam4_tok_s=<float> sample_tok_s=<float>
      parallel_tok_s=<float> parallel_refine2_tok_s=<float>
"""

import argparse
import sys

import flax.linen as nn
import jax
import numpy as np

from capjax import config as config_lib, decode, tasks
from capjax.tasks import base
import steps  # bench/steps.py


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="cappa_bench_cpu")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  return parser.parse_known_args(argv)


def methods(model, params, images, special, n: int, max_len: int) -> dict:
  """name -> a call that decodes `images`, n new tokens each."""
  fixed = {"special": special, "max_new_tokens": n, "min_new_tokens": n}
  return {
      "greedy": lambda: decode.greedy(model, params, images, **fixed),
      "recompute": lambda: decode.greedy(model, params, images, cached=False, **fixed),
      "beam4": lambda: decode.beam_search(model, params, images, beam_size=4, **fixed),
      "sample": lambda: decode.sample(model, params, images, jax.random.key(0), top_p=0.9,
                                      **fixed),
      "parallel": lambda: decode.parallel(model, params, images, special=special,
                                          length=max_len, max_new_tokens=n),
      "parallel_refine2": lambda: decode.parallel(model, params, images, special=special,
                                                  length=max_len, refine_steps=2,
                                                  max_new_tokens=n),
  }


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  config = config_lib.load(args.config, ["--config.model.head_init=fan_in"] + overrides)
  config.model.max_len = max(config.model.max_len, args.new_tokens)
  task = tasks.get(config, steps.IDS)
  params = jax.jit(lambda: nn.meta.unbox(task.init_params(jax.random.key(0))))()
  rng = np.random.default_rng(0)
  s = config.data.image_size
  images = base.normalize_images(
      rng.integers(0, 256, (args.batch_size, s, s, 3), dtype=np.uint8), task.dtype)
  calls = methods(task.model, params, images, steps.IDS, args.new_tokens, config.model.max_len)
  for call in calls.values():  # compile
    jax.block_until_ready(call())
  best = {name: float("inf") for name in calls}
  for _ in range(max(args.rounds, 1)):
    for name, call in calls.items():
      best[name] = min(best[name], steps.timed(call)[0])
  tokens = args.batch_size * args.new_tokens
  tok_s = {name: tokens / seconds for name, seconds in best.items()}
  print(f"{args.config}: batch {args.batch_size}, {args.new_tokens} new tokens, "
        f"{config.dtype}, {jax.devices()[0].platform}")
  print(f"{'method':<18} {'seconds':>9} {'tokens/s':>10} {'vs recompute':>13}")
  for name in calls:
    print(f"{name:<18} {best[name]:>9.3f} {tok_s[name]:>10.0f} "
          f"{tok_s[name] / tok_s['recompute']:>12.2f}x")
  fields = {"cache_speedup": tok_s["greedy"] / tok_s["recompute"],
            **{f"{name}_tok_s": value for name, value in tok_s.items()}}
  print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in fields.items()))


if __name__ == "__main__":
  main()
