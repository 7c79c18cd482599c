"""Device peaks for MFU. Model FLOPs are analytic, per task (`Task.flops_per_example`):
XLA's cost analysis counts a scanned layer once."""

import time

import jax
import jax.numpy as jnp

# bf16 dense peak per chip, FLOP/s.
PEAK_FLOPS = {"TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted bf16-input, f32-accumulate n x n matmul on the default device."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops_per_device() -> tuple[float, str]:
  """(FLOP/s, source): the data-sheet bf16 peak if known, else a measured matmul roofline."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak, f"datasheet {name}"
  return measured_matmul_flops(), f"measured bf16 matmul on {kind}"
