"""Train-step speed and MFU, optionally side by side with clip-jax, in one process.

  python bench/train_step.py --config=cappa_bench_cpu [--compare=clipjax,legacy] [--steps=N]
      [--config.a.b=value ...]

Measures on the current devices: the roofline (best FLOP/s of a jitted bf16-input,
float32-accumulate matmul big enough to saturate them), capjax's jitted train step
(as train.py builds it: shardings, donation) on a fixed random batch, and, with
--compare=clipjax, clip-jax's CapPa at the same sizes (bench/clipjax_cappa.py); with
--compare=legacy, capjax's step again under `model.matmul_policy=legacy` (capjax's
matmuls before issue 18: bf16 results, autodiff backward). Both: --compare=clipjax,legacy.
Rounds interleave the contenders (one step each, then the matmuls) so that
background load hits them alike; times are medians over the rounds after compiling.
Model FLOPs are analytic (the task's `flops_per_example`), so MFU = model FLOP/s / roofline.
`cpu_s` is the process CPU time per step (the sum over threads), a second view that
other processes' load disturbs less than wall time.

The same-size float32 matmul is printed too: where it beats the bf16 one (XLA:CPU
without AMX), MFU against the bf16 roofline flatters.

The last line is machine-readable (nan for a contender not run):
  RESULT mfu=<float> capjax_ex_s=<float> clipjax_ex_s=<float> ratio=<float>
      legacy_ex_s=<float> ratio_legacy=<float>
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from capjax import config as config_lib, flops
import steps  # bench/steps.py


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="cappa_bench_cpu")
  parser.add_argument("--compare", default="",
                      help="comma-separated contenders: clipjax, legacy")
  parser.add_argument("--steps", type=int, default=12, help="timed rounds (>= 10)")
  parser.add_argument("--matmul_size", type=int, default=0,
                      help="roofline matmul side; 0: 2048 on CPU, 8192 on accelerators")
  return parser.parse_known_args(argv)


class Roofline:
  """A jitted n x n matmul per device (bf16 inputs by default), float32 accumulation."""

  def __init__(self, n: int, dtype=jnp.bfloat16):
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    rows = n * len(devices)  # n x n per device
    self.a = jax.device_put(jnp.ones((rows, n), dtype), sh)
    self.b = jax.device_put(jnp.ones((n, n), dtype),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self.fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    self.flop = 2.0 * rows * n * n
    self.fn(self.a, self.b).block_until_ready()

  def run(self):
    return self.fn(self.a, self.b)


def measure(contenders: dict, rounds: int) -> dict:
  """Interleaved rounds of one call each; returns {name: [(wall, cpu), ...]}."""
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, run in contenders.items():
      times[name].append(steps.timed(run))
  return times


def compile_all(contenders: dict) -> dict:
  """Compiles and runs each step twice (the second call reuses donated buffers)."""
  seconds = {}
  for name, step in contenders.items():
    start = time.perf_counter()
    jax.block_until_ready(step.run())
    seconds[name] = time.perf_counter() - start
    jax.block_until_ready(step.run())
  return seconds


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  config = config_lib.load(args.config, overrides)
  compare = [name for name in args.compare.split(",") if name]
  if unknown := set(compare) - {"clipjax", "legacy"}:
    raise SystemExit(f"--compare: unknown {sorted(unknown)}; expected clipjax and/or legacy.")
  batch = steps.random_batch(config)
  contenders = {"capjax": steps.CapjaxStep(config)}
  if "clipjax" in compare:
    import clipjax_cappa  # pylint: disable=g-import-not-at-top
    contenders["clipjax"] = clipjax_cappa.ClipjaxStep(
        config, steps.IDS.mask, steps.IDS.pad, steps.IDS.bos, steps.IDS.eos)
  if "legacy" in compare:
    contenders["legacy"] = steps.CapjaxStep(config_lib.load(
        args.config, overrides + ["--config.model.matmul_policy=legacy"]))
  for step in contenders.values():
    step.init(batch)
  compile_s = compile_all(contenders)

  platform = jax.devices()[0].platform
  n = args.matmul_size or (2048 if platform == "cpu" else 8192)
  roofline, f32_matmul = Roofline(n), Roofline(n, jnp.float32)
  runs = {name: step.run for name, step in contenders.items()}
  rounds = max(args.steps, 10)
  times = measure({**runs, "roofline": roofline.run, "f32": f32_matmul.run}, rounds)
  roof, f32 = times.pop("roofline"), times.pop("f32")

  b = config.train.batch_size
  flop_per_step = b * contenders["capjax"].run_setup.task.flops_per_example()
  roof_flops = roofline.flop / min(w for w, _ in roof)
  roof_cpu_flops = roofline.flop / statistics.median(c for _, c in roof)
  f32_flops = f32_matmul.flop / min(w for w, _ in f32)
  peak, source = flops.peak_flops_per_device()
  devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"config {args.config} {' '.join(overrides)} | devices {devices} | batch {b} | "
        f"dtype {config.dtype} | model.matmul_policy {config.model.get('matmul_policy')}")
  print(f"model {flop_per_step / b / 1e9:.3f} GFLOP per example (train, analytic); "
        f"roofline {roof_flops / 1e9:.1f} GFLOP/s (bf16 {n}x{n} matmul, best of "
        f"{len(roof)}), {roof_cpu_flops / 1e9:.1f} GFLOP per CPU-second (median); "
        f"float32 matmul {f32_flops / 1e9:.1f} GFLOP/s")
  if not source.startswith("measured"):
    print(f"datasheet peak {peak * jax.device_count() / 1e12:.1f} TFLOP/s ({source})")
  header = (f"{'impl':8} {'params':>10} {'compile_s':>9} {'step_ms':>9} {'ex/s':>8} "
            f"{'GFLOP/s':>8} {'MFU':>6} {'cpu_ms':>8} {'MFU_cpu':>7}")
  print(header)
  print("-" * len(header))
  ex_s, mfu = {}, {}
  for name, step in contenders.items():
    wall = statistics.median(w for w, _ in times[name])
    cpu = statistics.median(c for _, c in times[name])
    ex_s[name] = b / wall
    mfu[name] = flop_per_step / wall / roof_flops
    mfu_cpu = flop_per_step / cpu / roof_cpu_flops
    print(f"{name:8} {step.num_params():>10,} {compile_s[name]:>9.1f} {wall * 1e3:>9.1f} "
          f"{ex_s[name]:>8.1f} {flop_per_step / wall / 1e9:>8.1f} {mfu[name]:>6.3f} "
          f"{cpu * 1e3:>8.1f} {mfu_cpu:>7.3f}")
  print("MFU against the float32 matmul: " + ", ".join(
      f"{name} {mfu[name] * roof_flops / f32_flops:.3f}" for name in contenders))
  nan = float("nan")
  ratios = {}
  for name in ("clipjax", "legacy"):
    if name in ex_s:
      ratios[name] = ex_s["capjax"] / ex_s[name]
      cpu_ratio = (statistics.median(c for _, c in times[name])
                   / statistics.median(c for _, c in times["capjax"]))
      print(f"capjax / {name} examples/s: {ratios[name]:.3f} (wall), {cpu_ratio:.3f} (CPU time)")
  print(f"RESULT mfu={mfu['capjax']:.4f} capjax_ex_s={ex_s['capjax']:.2f} "
        f"clipjax_ex_s={ex_s.get('clipjax', nan):.2f} ratio={ratios.get('clipjax', nan):.4f} "
        f"legacy_ex_s={ex_s.get('legacy', nan):.2f} "
        f"ratio_legacy={ratios.get('legacy', nan):.4f}")


if __name__ == "__main__":
  main()
