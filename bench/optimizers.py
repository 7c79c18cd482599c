"""AdamW vs Adafactor vs Shampoo on a tiny CapPa and the built-in shapes data, in one run.

  .venv/bin/python bench/optimizers.py [--steps=300] [--rounds=4] [--seed=0] [--small] [--quick]

Every optimizer trains the same model from the same init on the same batches in the same
order (`seed`), with the same schedule (warmup_cosine, 10% warmup) and no weight decay, for
--steps steps; each tries the learning rates of its row of SWEEP and keeps the best
validation loss (seed 003's: captioning objective only, on the first VAL_EXAMPLES
validation images). The learning rate is a value in the optimizer state, not a constant of
the program (`lr_scaled`), so each optimizer compiles once for the whole sweep; the update
of all three optimizers is linear in the learning rate, so this changes nothing else.

Time per step is measured afterwards, from the best run of each, in --rounds interleaved
rounds of ROUND_STEPS steps (one Shampoo preconditioner computation each) in rotating
order; the table shows the median round. The last line is machine-readable.
"""

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capjax import config as config_lib, setup as setup_lib, sharding, trainer
from capjax.data import pipeline
from capjax.train import ensure_tokenizer

# --small: shapes_tiny's model on 32x32 images in batches of 32 (about 3x faster; the
# learning rates and b2 below were swept this way, seeds 0 and 1).
SMALL = {"data.image_size": 32, "train.batch_size": 32}
# Peak learning rates tried, per optimizer: around the best of wider sweeps (docs/optimizers.md).
# Shampoo's momentum is not damped by (1 - b1) (as in the reference), so its steps are ~10x
# AdamW's at the same learning rate.
SWEEP = {"adamw": (1e-3, 1.5e-3, 2e-3), "adafactor": (5e-3, 1e-2, 2e-2),
         "shampoo": (1e-4, 1.4e-4, 2e-4)}
# Beyond the shared settings (b1=0.9, no weight decay): b2 tuned per optimizer on this
# benchmark (AdamW 0.95 of 0.9 / 0.95 / 0.99 / 0.999; Shampoo 0.9 of 0.9 / 0.95 / 0.99),
# else each optimizer's defaults (factory.py). Shampoo: blocks of up to 128 x 128 (whole
# matrices), dims merged up to the width (so (128, 4, 32) kernels are 128 x 128 matrices,
# not (512, 32) ones), preconditioned from step 21 with inverse roots every 20 steps.
OPTIMIZER = {"adamw": {"b2": 0.95}, "adafactor": {},
             "shampoo": {"b2": 0.9, "block_size": 128, "merge_small_dims_block_size": 128,
                         "start_preconditioning_step": 21, "preconditioning_compute_steps": 20}}
ROUND_STEPS = 20  # = Shampoo's preconditioning_compute_steps
VAL_EXAMPLES = 512


def bench_config(name: str, steps: int, seed: int = 0,
                 small: bool = False) -> ml_collections.ConfigDict:
  overrides = {**(SMALL if small else {}), "seed": seed, "optimizer.name": name,
               "optimizer.weight_decay": 0.0, "train.num_steps": steps, "schedule.name": "warmup_cosine",
               "schedule.peak_lr": 1.0, "schedule.warmup_steps": steps // 10,
               "data.num_threads": 2, "wandb.mode": "disabled"}
  config = config_lib.load("shapes_tiny", [f"--config.{k}={v}" for k, v in overrides.items()])
  with config.unlocked():
    config.optimizer.update(OPTIMIZER[name])
  return config


def lr_scaled(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer`, its updates times a learning rate kept in the state (see `with_lr`)."""
  return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def with_lr(state: trainer.TrainState, lr: float) -> trainer.TrainState:
  inner, scale = state.opt_state
  hyperparams = dict(scale.hyperparams, step_size=jnp.asarray(lr, jnp.float32))
  return state.replace(opt_state=(inner, scale._replace(hyperparams=hyperparams)))


class Run:
  """One optimizer's jitted train step and fresh states, on one device."""

  def __init__(self, config, tok, mesh):
    self.name, self.config = config.optimizer.name, config
    self.setup = setup_lib.assemble(config, tok.special, mesh, wrap_optimizer=lr_scaled)
    self.init_state = self.setup.init_state()
    self.step_fn, self.context = self.setup.train_step, self.setup.context

  def fresh_state(self, lr):
    return with_lr(jax.tree.map(jnp.copy, self.init_state), lr)

  def train(self, state, batches):
    with self.context():
      for batch in batches:
        state, metrics = self.step_fn(state, batch)
    jax.block_until_ready(metrics)
    return state, metrics


def validation_loss(run, eval_step, params, val_batches) -> float:
  with run.context():
    losses = [float(eval_step(params, batch)) for batch in val_batches]
  return float(np.mean(losses))


def sweep(run, lrs, batches, eval_step, val_batches, log):
  """{lr: (val loss, final state)}: one training run per learning rate."""
  results = {}
  for lr in lrs:
    start = time.perf_counter()
    state, metrics = run.train(run.fresh_state(lr), batches)
    loss = validation_loss(run, eval_step, state.params, val_batches)
    results[lr] = (loss, state)
    log(f"{run.name:9s} lr={lr:g}: train loss {float(metrics['train/loss']):.4f}, "
        f"val loss {loss:.4f} ({time.perf_counter() - start:.0f} s)")
  return results


def time_steps(runs, states, batches, rounds):
  """{name: [ms per step of each round]}, rounds interleaved in rotating order."""
  times = {name: [] for name in runs}
  names = list(runs)
  for r in range(rounds + 1):  # round 0 warms up (allocation, caches); not counted
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      states[name], _ = runs[name].train(states[name], batches[:ROUND_STEPS])
      if r:
        times[name].append((time.perf_counter() - start) / ROUND_STEPS * 1000)
  return times


def table(results, times) -> list[str]:
  adamw_ms = statistics.median(times["adamw"])
  lines = [f"{'optimizer':10s} {'best lr':>8s} {'val loss':>9s} {'ms/step':>8s} "
           f"{'x adamw':>8s}   sweep: lr -> val loss"]
  for name, by_lr in results.items():
    best = min(by_lr, key=lambda lr: by_lr[lr][0])
    ms = statistics.median(times[name])
    swept = "  ".join(f"{lr:g} -> {loss:.4f}" for lr, (loss, _) in by_lr.items())
    lines.append(f"{name:10s} {best:8g} {by_lr[best][0]:9.4f} {ms:8.1f} {ms / adamw_ms:8.2f}"
                 f"   {swept}")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=4, help="timing rounds per optimizer")
  parser.add_argument("--seed", type=int, default=0, help="init and data order")
  parser.add_argument("--small", action="store_true", help="32x32 images, batch 32")
  parser.add_argument("--quick", action="store_true", help="smoke test: 40 steps, 1 lr each")
  args = parser.parse_args()
  steps = 40 if args.quick else args.steps
  lrs = {name: values[1:2] if args.quick else values for name, values in SWEEP.items()}
  began = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - began:6.0f} s] {msg}", flush=True)

  config = bench_config("adamw", steps, args.seed, args.small)
  tok = ensure_tokenizer(config, tempfile.mkdtemp(prefix="bench_optimizers_"))
  data = iter(pipeline.train_dataset(config, tok.path))
  batches = [next(data) for _ in range(steps)]
  val_batches = [{k: b[k] for k in ("image", "tokens")} for b in
                 pipeline.eval_batches(config, tok, "val", VAL_EXAMPLES, 128)]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  m = config.model
  log(f"{steps} steps of batch {config.train.batch_size} at {config.data.image_size}px, "
      f"{config.dtype}, {VAL_EXAMPLES} val examples; CapPa width {m.width}, "
      f"{m.enc_depth}+{m.dec_depth} layers, mlp {m.mlp_dim}, {m.num_heads} heads")

  runs, results = {}, {}
  eval_step = None
  for name in SWEEP:
    start = time.perf_counter()
    runs[name] = Run(bench_config(name, steps, args.seed, args.small), tok, mesh)
    if eval_step is None:
      eval_step = runs[name].setup.eval_step
    log(f"{name}: built ({time.perf_counter() - start:.0f} s)")
    results[name] = sweep(runs[name], lrs[name], batches, eval_step, val_batches, log)

  best_states = {name: min(by_lr.values(), key=lambda r: r[0])[1]
                 for name, by_lr in results.items()}
  times = time_steps(runs, best_states, batches, 2 if args.quick else args.rounds)
  log("ms/step per timing round: " + "; ".join(
      f"{name} " + " ".join(f"{t:.0f}" for t in ts) for name, ts in times.items()))
  print("\n".join(table(results, times)))
  best = {name: min(loss for loss, _ in by_lr.values()) for name, by_lr in results.items()}
  ratio = statistics.median(times["shampoo"]) / statistics.median(times["adamw"])
  print(f"RESULT adamw_val={best['adamw']:.4f} shampoo_val={best['shampoo']:.4f} "
        f"adafactor_val={best['adafactor']:.4f} shampoo_time_ratio={ratio:.2f}")


if __name__ == "__main__":
  main()
