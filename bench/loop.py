"""The train loop's throughput against the bare jitted step's, in one process.

  python bench/loop.py --config=shapes_tiny [--steps=200] [--config.a.b=value ...]

Runs `capjax.train.train` (the real loop: data pipeline, logging, non-finite checks;
evaluation and periodic checkpoints off) for --steps steps and reads its steady-state
`perf/examples_per_s` from `metrics.jsonl` (the median of the logged windows after the
first, which includes compilation). The bare step (bench/steps.py: jitted as train.py
jits it, one fixed batch already on the device, nothing else running) is timed before
and after the loop and the two medians averaged, so that drift in the machine's speed
hits both alike. The last line is machine-readable:
  RESULT loop_ex_s=<float> bare_ex_s=<float> ratio=<float>
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import jax

from capjax import config as config_lib, train
import steps  # bench/steps.py


def bare_step_seconds(step: "steps.CapjaxStep", count: int) -> float:
  """Median wall seconds per step over `count` waited-on steps."""
  return statistics.median(steps.timed(step.run)[0] for _ in range(count))


def loop_examples_per_s(config, workdir: str) -> list[float]:
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["perf/examples_per_s"] for r in rows if "perf/examples_per_s" in r]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="shapes_tiny")
  parser.add_argument("--steps", type=int, default=200, help="loop steps")
  parser.add_argument("--bare_steps", type=int, default=20, help="bare steps, before and after")
  args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  config = config_lib.load(args.config, [
      f"--config.train.num_steps={args.steps}", "--config.eval.every=0",
      "--config.checkpoint.every=0", "--config.wandb.mode=disabled", *overrides])
  if args.steps < 3 * config.train.log_every:
    parser.error(f"--steps must be >= 3 x train.log_every ({config.train.log_every}).")
  b = config.train.batch_size

  bare = steps.CapjaxStep(config)
  bare.init(steps.random_batch(config))
  bare_step_seconds(bare, 2)  # compile
  before = bare_step_seconds(bare, args.bare_steps)
  with tempfile.TemporaryDirectory(prefix="bench_loop_") as workdir:
    windows = loop_examples_per_s(config, workdir)
  after = bare_step_seconds(bare, args.bare_steps)

  loop_ex_s = statistics.median(windows[1:])
  bare_ex_s = b / ((before + after) / 2)
  print(f"config {args.config} {' '.join(overrides)} | batch {b} | "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"loop examples/s per log window: {' '.join(f'{x:.1f}' for x in windows)} "
        "(the first includes compilation)")
  print(f"bare step: {b / before:.1f} examples/s before the loop, {b / after:.1f} after")
  print(f"RESULT loop_ex_s={loop_ex_s:.2f} bare_ex_s={bare_ex_s:.2f} "
        f"ratio={loop_ex_s / bare_ex_s:.4f}")


if __name__ == "__main__":
  main()
