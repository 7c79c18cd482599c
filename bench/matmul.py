"""Matmul kernels on this machine, for the matmuls a config's train step runs.

  python bench/matmul.py [--config=cappa_bench_cpu] [--rounds=N] [--config.a.b=value ...]

For every matmul of the CapPa train step (forward, and both gradient matmuls of each)
at the config's sizes, times three paths on the default device: bf16 x bf16 -> bf16
(what capjax's legacy matmul policy asks for), bf16 x bf16 -> f32 (float32
accumulation via `preferred_element_type`: the f32_accum policy) and f32 x f32 -> f32.
Rounds interleave the paths; each time is the best of the rounds. Also prints which
path `model.matmul_policy` takes and whether the CPU has AMX / AVX512-BF16
(/proc/cpuinfo flags). The last line is machine-readable:
  RESULT amx=<0|1> avx512_bf16=<0|1> policy=<name> step_ms_bf16=<float>
      step_ms_bf16_f32=<float> step_ms_f32=<float> speedup=<bf16 / bf16_f32>
"""

import argparse
import collections
import os
import sys

import jax
import jax.numpy as jnp

from capjax import config as config_lib
import steps  # bench/steps.py

PATHS = {  # name -> (operand dtype, result dtype)
    "bf16": (jnp.bfloat16, jnp.bfloat16),
    "bf16_f32": (jnp.bfloat16, jnp.float32),
    "f32": (jnp.float32, jnp.float32),
}
POLICY_PATH = {"f32_accum": "bf16_f32", "legacy": "bf16"}


def cpu_flags() -> set[str]:
  if not os.path.exists("/proc/cpuinfo"):
    return set()
  with open("/proc/cpuinfo") as f:
    return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}


def forward_matmuls(config) -> list[tuple[str, int, int, int, int, int]]:
  """(name, batch G, M, K, N, count) of each forward matmul of one train step."""
  m, b = config.model, config.train.batch_size
  d, dd = m.width, (m.get("dec_width") or m.width)
  mlp, dmlp = m.mlp_dim, (m.get("dec_mlp_dim") or m.mlp_dim)
  n = (config.data.image_size // m.patch_size) ** 2
  t, length = n + m.num_registers, m.max_len
  heads, kh, dkh = m.num_heads, d // m.num_heads, dd // m.num_heads
  g = b * heads
  return [
      ("patch embed", 1, b * n, m.patch_size**2 * 3, d, 1),
      ("enc qkv", 1, b * t, d, 3 * d, m.enc_depth),
      ("enc scores", g, t, kh, t, m.enc_depth),
      ("enc values", g, t, t, kh, m.enc_depth),
      ("enc out", 1, b * t, d, d, m.enc_depth),
      ("enc gate/up", 1, b * t, d, 2 * mlp, m.enc_depth),
      ("enc down", 1, b * t, mlp, d, m.enc_depth),
      ("dec qkv", 1, b * length, dd, 3 * dd, m.dec_depth),
      ("dec self scores", g, length, dkh, length, m.dec_depth),
      ("dec self values", g, length, length, dkh, m.dec_depth),
      ("dec out", 1, b * length, dd, dd, 2 * m.dec_depth),  # self and cross
      ("dec cross q", 1, b * length, dd, dd, m.dec_depth),
      ("dec cross kv", 1, b * t, d, 2 * dd, m.dec_depth),
      ("dec cross scores", g, length, dkh, t, m.dec_depth),
      ("dec cross values", g, length, t, dkh, m.dec_depth),
      ("dec gate/up", 1, b * length, dd, 2 * dmlp, m.dec_depth),
      ("dec down", 1, b * length, dmlp, dd, m.dec_depth),
      ("vocab head", 1, b * length, dd, m.vocab_size, 1),
  ]


def step_matmuls(config) -> dict[tuple[int, int, int, int], int]:
  """{(G, M, K, N): count}: forward matmuls and both gradient matmuls of each
  (dx: M x N x K, dw: K x M x N)."""
  counts = collections.Counter()
  for _, g, m, k, n, count in forward_matmuls(config):
    for shape in ((g, m, k, n), (g, m, n, k), (g, k, m, n)):
      counts[shape] += count
  return dict(counts)


class Matmul:
  """One jitted [G,] M x K @ K x N matmul on one path."""

  def __init__(self, shape, path: str):
    g, m, k, n = shape
    operand, result = PATHS[path]
    lead = (g,) if g > 1 else ()
    self.a = jnp.ones(lead + (m, k), operand)
    self.b = jnp.ones(lead + (k, n), operand)
    self.fn = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=result))
    self.flop = 2.0 * g * m * k * n
    self.fn(self.a, self.b).block_until_ready()

  def run(self):
    return self.fn(self.a, self.b)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="cappa_bench_cpu")
  parser.add_argument("--rounds", type=int, default=10)
  return parser.parse_known_args(argv)


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  config = config_lib.load(args.config, overrides)
  flags = cpu_flags()
  amx, avx512_bf16 = "amx_bf16" in flags, "avx512_bf16" in flags
  policy = config.model.get("matmul_policy", "f32_accum")
  policy_path = "f32" if config.dtype == "float32" else POLICY_PATH[policy]
  counts = step_matmuls(config)
  kernels = {(shape, path): Matmul(shape, path) for shape in counts for path in PATHS}
  best = {key: float("inf") for key in kernels}
  for _ in range(max(args.rounds, 1)):
    for key, kernel in kernels.items():
      best[key] = min(best[key], steps.timed(kernel.run)[0])

  print(f"config {args.config} {' '.join(overrides)} | device {jax.devices()[0].device_kind} | "
        f"CPU flags: amx_bf16={amx} avx512_bf16={avx512_bf16} | jax {jax.__version__}")
  print(f"model.matmul_policy={policy}, dtype {config.dtype}: takes the {policy_path} path")
  header = (f"{'G x M x K x N':>24} {'count':>5} | GFLOP/s: {'bf16->bf16':>10} "
            f"{'bf16->f32':>10} {'f32':>8}")
  print(header)
  print("-" * len(header))
  step_ms = dict.fromkeys(PATHS, 0.0)
  for shape, count in sorted(counts.items(), key=lambda kv: -kv[1] * kernels[kv[0], "f32"].flop):
    rates = [kernels[shape, p].flop / best[shape, p] / 1e9 for p in PATHS]
    for p in PATHS:
      step_ms[p] += count * best[shape, p] * 1e3
    print(f"{' x '.join(map(str, shape)):>24} {count:>5} | {'':8} {rates[0]:>10.1f} "
          f"{rates[1]:>10.1f} {rates[2]:>8.1f}")
  print("all matmuls of one step, ms (sum of count x best time): " + ", ".join(
      f"{p} {ms:.1f}" for p, ms in step_ms.items()))
  speedup = step_ms["bf16"] / step_ms["bf16_f32"]
  print(f"RESULT amx={int(amx)} avx512_bf16={int(avx512_bf16)} policy={policy} "
        f"step_ms_bf16={step_ms['bf16']:.2f} step_ms_bf16_f32={step_ms['bf16_f32']:.2f} "
        f"step_ms_f32={step_ms['f32']:.2f} speedup={speedup:.3f}")


if __name__ == "__main__":
  main()
