"""Subprocess side of the checkpoint resharding test; prints one JSON line.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.checkpoint_worker DIR

Saves a train state (with non-zero optimizer moments) sharded on a
(data=1, fsdp=8, tensor=1) mesh, then restores it onto (2, 4, 1) and onto a
single device, and reports whether every array came back bit for bit and in the
target layout.
"""

import json
import sys

import jax
import ml_collections
import numpy as np

from capjax import checkpoint, setup, sharding
from capjax.data import tokenizer
from tests.helpers import tiny_config

SAVE_MESH = (1, 8, 1)
RESTORE_MESHES = ((2, 4, 1), (1, 1, 1))


def make_mesh(shape):
  data, fsdp, tensor = shape
  devices = jax.devices()[:data * fsdp * tensor]
  return sharding.make_mesh(
      ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}), devices)


def host_leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def num_sharded(tree) -> int:
  return sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))


def main(directory: str):
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config(**{"model.width": 64, "model.num_heads": 4, "model.mlp_dim": 128})
  run = setup.assemble(config, tokenizer.SENTENCEPIECE_IDS, make_mesh(SAVE_MESH))
  optimizer, state_sh = run.optimizer, run.state_shardings
  state = run.init_state()
  with run.context():
    # One update with the params as the "gradient", so the moments are not all zero.
    update = lambda s: s.replace(opt_state=optimizer.update(s.params, s.opt_state, s.params)[1])
    state = jax.jit(update, out_shardings=state_sh)(state)
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(7, state, config=config)
    ckpt.close()
  saved = host_leaves(state)
  report = {"saved_sharded_leaves": num_sharded(state)}
  for shape in RESTORE_MESHES:
    mesh = make_mesh(shape)
    target = setup.assemble(config, tokenizer.SENTENCEPIECE_IDS, mesh)
    target_sh = target.state_shardings
    with target.context():
      restored, step, _ = checkpoint.Checkpointer(directory).restore(target.abstract_state())
    layouts = [x.sharding == s for x, s in zip(
        jax.tree.leaves(restored), jax.tree.leaves(
            target_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))]
    report[",".join(map(str, shape))] = {
        "step": step,
        "bitwise_equal": all(a.dtype == b.dtype and a.tobytes() == b.tobytes()
                             for a, b in zip(saved, host_leaves(restored))),
        "in_target_layout": all(layouts),
        "num_devices": len(mesh.devices.flat),
        "sharded_leaves": num_sharded(restored),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1])
