"""Compile time and XLA memory of the train step versus depth and remat policy.

  python bench/compile.py [--config=cappa_bench_cpu] [--depths=4,12,24]
      [--remat_depth=12] [--repeats=2] [--scan_unroll=1] [--config.a.b=value ...]

Lowers and compiles capjax's jitted train step (as train.py builds it) on abstract
inputs, nothing allocated, with `model.enc_depth = model.dec_depth = depth` for each
depth; then, at `--remat_depth` layers, once per remat policy. `--scan_unroll` sets
model.scan_unroll (blocks per scan iteration; 1 is the models' default): with k,
compile time is flat in depth from 2k layers on, and depth k compiles without a loop
at all (cappa_bench_cpu's k=4 is a step-speed choice for its 4-layer towers).
Times are the best of `--repeats` (background load only ever adds time).
Memory is XLA's buffer assignment:
temp (activations, gradients, scratch) and peak (arguments + outputs + temp, less
what donation aliases: the most the step holds at once).

The last line is machine-readable:
  RESULT compile_s_4=<float> compile_s_24=<float> ratio_24_4=<float>
"""

import argparse
import sys
import time

from capjax import config as config_lib
from capjax.models import layers
import steps  # bench/steps.py


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="cappa_bench_cpu")
  parser.add_argument("--depths", default="4,12,24")
  parser.add_argument("--remat_depth", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--scan_unroll", type=int, default=1)
  return parser.parse_known_args(argv)


def compile_once(config) -> dict:
  """Seconds to trace+lower and to compile, and the compiled step's memory."""
  step = steps.CapjaxStep(config)
  start = time.perf_counter()
  lowered = step.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  mem = compiled.memory_analysis()
  live = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  return {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
          "total_s": done - start, "temp_mb": mem.temp_size_in_bytes / 2**20,
          "peak_mb": live / 2**20, "args_mb": mem.argument_size_in_bytes / 2**20}


def best_of(configs: dict, repeats: int) -> dict:
  """{name: stats}, taking each time's minimum over `repeats` interleaved passes."""
  best = {}
  for _ in range(repeats):
    for name, config in configs.items():
      stats = compile_once(config)
      if name not in best:
        best[name] = stats
      else:
        for key in ("lower_s", "compile_s", "total_s"):
          best[name][key] = min(best[name][key], stats[key])
  return best


def print_table(title: str, rows: dict):
  print(title)
  header = (f"{'':>14} {'lower_s':>8} {'compile_s':>9} {'total_s':>8} {'temp_MiB':>9} "
            f"{'peak_MiB':>9} {'params+opt_MiB':>14}")
  print(header)
  print("-" * len(header))
  for name, r in rows.items():
    print(f"{name:>14} {r['lower_s']:>8.2f} {r['compile_s']:>9.2f} {r['total_s']:>8.2f} "
          f"{r['temp_mb']:>9.1f} {r['peak_mb']:>9.1f} {r['args_mb']:>14.1f}")
  print()


def with_overrides(name: str, overrides: list[str], extra: dict):
  return config_lib.load(name, overrides + [f"--config.{k}={v}" for k, v in extra.items()])


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  depths = [int(d) for d in args.depths.split(",")]
  overrides = overrides + [f"--config.model.scan_unroll={args.scan_unroll}"]
  base = config_lib.load(args.config, overrides)
  print(f"config {args.config} {' '.join(overrides)} | width {base.model.width} | "
        f"batch {base.train.batch_size} | remat {base.model.remat_policy} | "
        f"scan_unroll {base.model.get('scan_unroll', 1)}\n")

  by_depth = best_of({f"{d} layers": with_overrides(
      args.config, overrides, {"model.enc_depth": d, "model.dec_depth": d}) for d in depths},
                     args.repeats)
  print_table("Train step vs depth (encoder = decoder depth)", by_depth)

  d = args.remat_depth
  by_policy = best_of({policy: with_overrides(
      args.config, overrides, {"model.enc_depth": d, "model.dec_depth": d,
                               "model.remat_policy": policy})
                       for policy in layers.REMAT_POLICIES}, 1)
  print_table(f"Remat policies at {d} layers", by_policy)

  first, last = by_depth[f"{depths[0]} layers"], by_depth[f"{depths[-1]} layers"]
  print(f"RESULT compile_s_{depths[0]}={first['total_s']:.2f} "
        f"compile_s_{depths[-1]}={last['total_s']:.2f} "
        f"ratio_{depths[-1]}_{depths[0]}={last['total_s'] / first['total_s']:.3f}")


if __name__ == "__main__":
  main()
