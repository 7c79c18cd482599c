"""Plan a pod run on this machine: compile the train step ahead of time for N simulated devices.

  python tools/plan_pod.py --config=cappa_l16_datacomp --devices=256 [--mfu=0.4]
      [--peak_tflops=197] [--hbm_gib=16] [--config.a.b=value ...]

Nothing is allocated: state and batch are `jax.ShapeDtypeStruct`s carrying their
shardings, and XLA:CPU partitions and compiles the step for a mesh of N CPU
devices. Prints per-device memory (params, optimizer state, XLA's temporaries),
FLOPs per step (XLA's count and the analytic one), and the step time this
implies on v5e chips (197 TFLOP/s bf16 each) at the given MFU. Exits 1 when
the estimated peak does not fit in --hbm_gib.

XLA:CPU stands in for the TPU compiler; its buffer assignment, fusion and bf16
handling differ, so the memory numbers are an estimate. For bf16 models it is
an overestimate: XLA:CPU keeps f32 copies of the bf16 activations that nn.scan
stacks for the backward pass (e.g. f32[24,32,264,3072] next to the bf16 one).
"""

import argparse
import os
import sys

GIB = 2.0**30


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py or a path")
  parser.add_argument("--devices", type=int, required=True, help="simulated chips")
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
  parser.add_argument("--peak_tflops", type=float, default=197.0, help="bf16 peak per chip")
  parser.add_argument("--hbm_gib", type=float, default=16.0, help="memory per chip")
  return parser.parse_known_args(argv)


def simulate_devices(n: int):
  """Must run before jax is imported: n CPU devices stand in for the chips."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def compile_plan(config, num_devices: int):
  """AOT-compiles init and train step; returns a dict of the numbers to report."""
  import jax  # pylint: disable=g-import-not-at-top
  from capjax import setup as setup_lib, sharding  # pylint: disable=g-import-not-at-top
  from capjax.data import tokenizer  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == num_devices, jax.devices()
  # Special ids do not change the plan: those of a tokenizer made by capjax.
  run = setup_lib.assemble(config, tokenizer.SENTENCEPIECE_IDS)
  with run.context():
    init = run.init_fn()
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=sharding.replicated(run.mesh))
    init_compiled = init.lower(key).compile()
    abstract_state = jax.eval_shape(init, key)
    compiled = run.train_step.lower(run.abstract_state(), run.abstract_batch()).compile()
  one_layer = setup_lib.assemble(one_layer_each(config), tokenizer.SENTENCEPIECE_IDS, run.mesh)

  mem, init_mem = compiled.memory_analysis(), init_compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state.params))
  b = config.train.batch_size
  return {
      "mesh": dict(run.mesh.shape), "batch_per_device": run.batch_sharding.shard_shape((b,))[0],
      "num_params": sum(x.size for x in jax.tree.leaves(abstract_state.params)),
      "params_total": param_bytes,
      "params": sharding.bytes_per_device(abstract_state.params, run.state_shardings.params),
      "opt_state": sharding.bytes_per_device(abstract_state.opt_state,
                                             run.state_shardings.opt_state),
      "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
      "aliased": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
      "code": mem.generated_code_size_in_bytes,
      "init_outputs": init_mem.output_size_in_bytes, "init_temp": init_mem.temp_size_in_bytes,
      "xla_flops_per_device": float(cost.get("flops", 0.0)),
      "analytic_flops": b * run.task.flops_per_example(),
      "analytic_flops_one_layer": b * one_layer.task.flops_per_example(),
      "state_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)),
  }


def depth_keys(model_config) -> list[str]:
  """The model's layer counts (`enc_depth`, `dec_depth`, ...): what nn.scan stacks."""
  return sorted(k for k in model_config.keys() if k.endswith("depth"))


def one_layer_each(config):
  """The config with one layer in every stack: what XLA's cost analysis sees of a scanned
  model."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  one = ml_collections.ConfigDict(config.to_dict())
  for key in depth_keys(one.model):
    one.model[key] = 1
  return one


def peak_bytes(plan) -> int:
  """Live at once: inputs, outputs not written in place of a donated input, temporaries."""
  return plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temp"]


def report(plan, config, args) -> list[str]:
  gib = lambda n: f"{n / GIB:8.3f} GiB"
  n, m = args.devices, config.model
  depths = ", ".join(f"{k} {m[k]}" for k in depth_keys(m))
  xla_total = plan["xla_flops_per_device"] * n
  step_s = plan["analytic_flops"] / (n * args.peak_tflops * 1e12 * args.mfu)
  peak = peak_bytes(plan)
  return [
      f"config {args.config}: {plan['num_params'] / 1e6:.1f}M params "
      f"({gib(plan['params_total']).strip()} f32), task {config.task}, {depths}, "
      f"remat {m.remat_policy!r}, dtype {config.dtype}, optimizer {config.optimizer.name}",
      f"mesh {plan['mesh']} on {n} devices; global batch {config.train.batch_size}, "
      f"{plan['batch_per_device']:g} per data-parallel device",
      "",
      "per-device memory (train step)",
      f"  params                     {gib(plan['params'])}",
      f"  optimizer state            {gib(plan['opt_state'])}",
      f"  arguments (state + batch)  {gib(plan['arguments'])}",
      f"  temporaries (XLA)          {gib(plan['temp'])}",
      f"  outputs not aliased        {gib(plan['outputs'] - plan['aliased'])}",
      f"  generated code             {gib(plan['code'])}",
      f"  peak estimate              {gib(peak)}  of {args.hbm_gib:g} GiB: "
      + ("fits" if peak <= args.hbm_gib * GIB else "DOES NOT FIT"),
      f"  sharded init: outputs {gib(plan['init_outputs']).strip()}, temporaries "
      f"{gib(plan['init_temp']).strip()} (whole state: {gib(plan['state_total']).strip()})",
      "",
      "FLOPs per step",
      f"  analytic (the task's, 6 x matmul MACs)     {plan['analytic_flops']:.4g}",
      f"  XLA cost_analysis x {n} devices           {xla_total:.4g}  "
      f"({xla_total / plan['analytic_flops']:.2f} of analytic)",
      f"  analytic, 1 layer in each stack            {plan['analytic_flops_one_layer']:.4g}",
      "  XLA counts each nn.scan body once, not once per layer, so its number misses",
      f"  all but one layer of each stack ({depths}); it is near the 1-layer analytic count",
      "  (plus remat recompute and non-matmul ops). MFU and step time use the analytic count.",
      "",
      f"v5e estimate at MFU {args.mfu:g} ({args.peak_tflops:g} TFLOP/s bf16 per chip, {n} chips)",
      f"  step time    {step_s * 1e3:8.1f} ms",
      f"  examples/s   {config.train.batch_size / step_s:8.0f}",
      f"  {config.train.num_steps} steps   {config.train.num_steps * step_s / 3600:8.1f} h",
  ]


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  simulate_devices(args.devices)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from capjax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config_lib.load(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  plan = compile_plan(config, args.devices)
  print("\n".join(report(plan, config, args)))
  return 0 if peak_bytes(plan) <= args.hbm_gib * GIB else 1


if __name__ == "__main__":
  sys.exit(main())
