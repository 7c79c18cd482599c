"""Subprocess side of the multi-device and multi-process tests; prints one JSON line.

  python -m tests.multihost_worker meshes [--meshes="1,8,1;2,2,2"]
      (with XLA_FLAGS=--xla_force_host_platform_device_count=8): 3 train steps on
      1 device and on (data, fsdp, tensor) meshes of 8 devices; reports
      losses, the largest param difference to 1 device, and how finely the
      fsdp=8 state is split.
  python -m tests.multihost_worker process --port=P --process_id=I --num_processes=2
      --tokenizer=T --out=DIR
      one of two processes x 4 CPU devices under jax.distributed: 3 steps on
      the real input pipeline; reports losses and the source indices it read.
  python -m tests.multihost_worker reference --tokenizer=T --out=DIR
      the same 3 steps in one process on 1 device, fed both processes' batches.
  python -m tests.multihost_worker rules (8 devices): one Shampoo step on a (4, 2, 1) mesh
      under the default sharding rules and under rules that put the batch and the optimizer
      statistics on "data" alone; reports the specs and split fractions of both.

Runs from the repository root (`-m`), so `tests.helpers` imports.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

from capjax.data import registry, synthetic

# Tiny CapPa whose dims split 8 ways: width 64 (fsdp=8), 4 heads and MLP 128 (tensor=2).
# A constant learning rate so that every step moves the params. Adam's eps is large
# because with eps=1e-8 its first steps are +-lr * sign(grad) for every weight: a grad
# that is 0 up to float32 rounding (~1e-9) turns a different reduction order into an
# lr-sized param difference. With eps=1e-3 the step is smooth in the gradient, so the
# comparison measures the sharding rather than Adam's sign function.
SHARDED_OVERRIDES = {"model.width": 64, "model.num_heads": 4, "model.mlp_dim": 128,
                     "model.enc_depth": 2, "model.dec_depth": 2, "train.batch_size": 16,
                     "dtype": "float32", "schedule.name": "constant", "schedule.peak_lr": 1e-3,
                     "optimizer.eps": 1e-3}
MESHES = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2))
NUM_STEPS = 3


class IndexedSource:
  """The shapes source with each image's index written into its first pixel (base 256)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = dict(self.source[index])
    image = record["image"].copy()
    image[0, 0] = [index // 65536, index // 256 % 256, index % 256]
    record["image"] = image
    return record


@registry.register("indexed_shapes")
def make_indexed_source(data_config, split):
  return IndexedSource(synthetic.make_source(data_config, split))


def source_indices(images_BxHxWx3) -> list[int]:
  pixel = images_BxHxWx3[:, 0, 0].astype(np.int64)
  return (pixel[:, 0] * 65536 + pixel[:, 1] * 256 + pixel[:, 2]).tolist()


def sharded_config(**overrides):
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  return tiny_config(**{**SHARDED_OVERRIDES, **overrides})


def random_batches(config, num_steps: int = NUM_STEPS, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  b, s = config.train.batch_size, config.data.image_size
  return [{"image": rng.integers(0, 256, (b, s, s, 3), np.uint8),
           "tokens": rng.integers(5, config.model.vocab_size, (b, config.model.max_len + 1),
                                  np.int32)} for _ in range(num_steps)]


def run_steps(config, mesh, local_batches, special=None):
  """Creates the sharded state on `mesh`, runs one train step per batch.

  Returns (losses, final state, the step's lowered StableHLO text).
  """
  from capjax import setup  # pylint: disable=g-import-not-at-top
  from capjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  run = setup.assemble(config, special or tokenizer.SENTENCEPIECE_IDS, mesh)
  state = run.init_state()
  with run.context():
    step = run.train_step
    hlo = step.lower(state, run.global_batch(local_batches[0])).as_text()
    losses = []
    for batch in local_batches:
      state, metrics = step(state, run.global_batch(batch))
      losses.append(float(metrics["train/loss"]))
  return losses, state, hlo


def activation_constraints(hlo: str) -> list[str]:
  """The mesh axes of every sharding constraint in lowered StableHLO (Shardy dialect)."""
  return [line.split("<@mesh, ")[1].split(">")[0] for line in hlo.splitlines()
          if "sdy.sharding_constraint" in line]


def host_params(state) -> dict:
  """Params as a flat {path: numpy array} (gathered from all processes)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  params = multihost_utils.process_allgather(state.params, tiled=True)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def max_param_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def split_report(state) -> dict:
  """Addressable fraction of every param with >= 4096 elements and of its AdamW mu / nu."""
  from capjax import sharding  # pylint: disable=g-import-not-at-top
  big = lambda x: x.size >= 4096
  params = {jax.tree_util.keystr(p): sharding.addressable_fraction(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0] if big(x)}
  opt = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    name = jax.tree_util.keystr(path)
    if big(x) and (".mu" in name or ".nu" in name):
      opt[name] = sharding.addressable_fraction(x)
  return {"params": params, "opt_state": opt}


def meshes_main(meshes):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from capjax import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  config = sharded_config()
  batches = random_batches(config)
  one = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  ref_losses, ref_state, _ = run_steps(
      config, sharding.make_mesh(one, jax.devices()[:1]), batches)
  ref_params = host_params(ref_state)
  report = {"reference": ref_losses, "meshes": {}}
  for data, fsdp, tensor in meshes:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        {"data": data, "fsdp": fsdp, "tensor": tensor}))
    losses, state, hlo = run_steps(config, mesh, batches)
    entry = {"losses": losses, "max_param_diff": max_param_diff(host_params(state), ref_params),
             "constraints": activation_constraints(hlo)}
    if fsdp == 8:
      entry["split"] = split_report(state)
    report["meshes"][f"{data},{fsdp},{tensor}"] = entry
  print(json.dumps(report))


def custom_rules(rules) -> tuple:
  """`rules` with the batch and the optimizer statistics on "data" only (fsdp left alone)."""
  moved = {"act_batch": "data", "opt_stats": "data"}
  return tuple((name, moved.get(name, axes)) for name, axes in rules)


def rules_main():
  """Batch and Shampoo-statistics shardings, after one step, under two sets of rules."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from capjax import sharding  # pylint: disable=g-import-not-at-top
  from capjax.optim.shampoo import ShampooParamState  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 2, "tensor": 1}))
  report = {}
  for name in ("default", "custom"):
    config = sharded_config(**{"optimizer.name": "shampoo", "optimizer.block_size": 16,
                               "optimizer.merge_small_dims_block_size": 64,
                               "optimizer.start_preconditioning_step": 1})
    if name == "custom":
      with config.unlocked():
        config.sharding.rules = custom_rules(config.sharding.rules)
    from capjax import setup  # pylint: disable=g-import-not-at-top
    from capjax.data import tokenizer  # pylint: disable=g-import-not-at-top
    run = setup.assemble(config, tokenizer.SENTENCEPIECE_IDS, mesh)
    state = run.init_state()
    batch = run.global_batch(random_batches(config, 1)[0])
    with run.context():
      state, _ = run.train_step(state, batch)
    stats = [leaf.statistics for leaf in jax.tree.leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, ShampooParamState))
             if isinstance(leaf, ShampooParamState) and leaf.statistics.size >= 4096]
    report[name] = {
        "batch_specs": sorted({str(x.sharding.spec) for x in batch.values()}),
        "batch_fraction": [sharding.addressable_fraction(x) for x in batch.values()],
        "stats_specs": sorted({str(x.sharding.spec) for x in stats}),
        "stats_fraction": sorted({sharding.addressable_fraction(x) for x in stats}),
        "num_stats": len(stats)}
  print(json.dumps(report))


def pipeline_config(tokenizer_path: str, **overrides):
  return sharded_config(**{"data.name": "indexed_shapes", "tokenizer.path": tokenizer_path,
                           "mesh.data": 1, "mesh.fsdp": -1, **overrides})


def pipeline_batches(config, process_index: int, process_count: int, num_steps: int = NUM_STEPS):
  """The first `num_steps` local batches this process's input pipeline yields."""
  from capjax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = iter(pipeline.train_dataset(config, config.tokenizer.path, process_index, process_count))
  return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(num_steps)]


def process_main(args):
  """One of `num_processes` processes x 4 CPU devices; the mesh spans all of them."""
  from capjax import metrics_log, sharding  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id)
  config = pipeline_config(args.tokenizer)
  batches = pipeline_batches(config, jax.process_index(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  losses, state = train_on(config, mesh, batches)
  writer = metrics_log.MetricsWriter(args.out, config, NUM_STEPS)
  for step, loss in enumerate(losses, 1):
    writer.write(step, {"train/loss": loss})
  writer.close()
  params = host_params(state)
  if jax.process_index() == 0:
    np.savez(os.path.join(args.out, "params.npz"), **params)
  print(json.dumps({
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "local_devices": jax.local_device_count(), "devices": jax.device_count(),
      "mesh": dict(mesh.shape), "losses": losses,
      "indices": [source_indices(b["image"]) for b in batches]}))
  jax.distributed.shutdown()


def reference_main(args):
  """One process, one device, fed what each of the `num_processes` processes would read."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from capjax import sharding  # pylint: disable=g-import-not-at-top
  config = pipeline_config(args.tokenizer)
  per_process = [pipeline_batches(config, i, args.num_processes)
                 for i in range(args.num_processes)]
  batches = [{k: np.concatenate([p[step][k] for p in per_process]) for k in ("image", "tokens")}
             for step in range(NUM_STEPS)]
  one = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  losses, state = train_on(config, sharding.make_mesh(one, jax.devices()[:1]), batches)
  np.savez(os.path.join(args.out, "reference_params.npz"), **host_params(state))
  print(json.dumps({"losses": losses, "indices": [[source_indices(b["image"]) for b in p]
                                                   for p in per_process]}))


def train_on(config, mesh, batches):
  from capjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer(config.tokenizer.path)
  losses, state, _ = run_steps(config, mesh, batches, tok.special)
  return losses, state


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("meshes", "process", "reference", "rules"))
  parser.add_argument("--meshes", default=";".join(",".join(map(str, m)) for m in MESHES),
                      help="data,fsdp,tensor;... (meshes mode)")
  parser.add_argument("--port", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--tokenizer")
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  meshes = [tuple(map(int, m.split(","))) for m in args.meshes.split(";")]
  {"meshes": lambda: meshes_main(meshes), "process": lambda: process_main(args),
   "reference": lambda: reference_main(args), "rules": rules_main}[args.mode]()


if __name__ == "__main__":
  main(sys.argv[1:])
