"""Analytic model FLOPs (XLA's cost analysis counts a scanned layer once) and device peaks.

Forward FLOPs per example = 2 x (multiply-adds of every matmul), attention included:
  encoder, T = patches + registers tokens, per layer:
    4*T*D*D (q,k,v,o) + 2*T*T*D (scores and weighted sum) + 3*T*D*M (GeGLU gate/up/down)
  decoder, L tokens, per layer:
    4*L*D*D + 2*L*L*D (self) + 2*L*D*D + 2*T*D*D + 2*L*T*D (cross) + 3*L*D*M
  plus patch embedding N*P*D and the vocabulary projection L*D*V.
Training = 3 x forward (backward is twice the forward).
"""

import time

import jax
import jax.numpy as jnp

# bf16 dense peak per chip, FLOP/s.
PEAK_FLOPS = {"TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def cappa_forward_flops_per_example(model_config, image_size: int) -> float:
  m = model_config
  d, dd = m.width, (m.get("dec_width") or m.width)
  mlp, dmlp = m.mlp_dim, (m.get("dec_mlp_dim") or m.mlp_dim)
  n = (image_size // m.patch_size) ** 2
  t, length = n + m.num_registers, m.max_len
  macs = n * (m.patch_size**2 * 3) * d
  macs += m.enc_depth * (4 * t * d * d + 2 * t * t * d + 3 * t * d * mlp)
  macs += m.dec_depth * (4 * length * dd * dd + 2 * length * length * dd
                         + 2 * length * dd * dd + 2 * t * d * dd + 2 * length * t * dd
                         + 3 * length * dd * dmlp)
  macs += length * dd * m.vocab_size
  return 2.0 * macs


def cappa_train_flops_per_example(model_config, image_size: int) -> float:
  return 3.0 * cappa_forward_flops_per_example(model_config, image_size)


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
