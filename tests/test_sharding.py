"""Mesh, logical rules, state/batch shardings; 8 simulated devices against 1; pod planner.

The pytest process has one CPU device, so the multi-device runs happen in a
subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8
(tests/multihost_worker.py). Shardings themselves are checked on abstract meshes.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from capjax import config as config_lib, sharding
from capjax.optim import shampoo
from tests import helpers
from tests.helpers import tiny_config
from tests.multihost_worker import SHARDED_OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"


def mesh_config(data, fsdp, tensor):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


RULES = sharding.rules_from_config(config_lib.base())


def abstract_mesh(data=1, fsdp=8, tensor=1):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


@pytest.mark.parametrize("sizes,devices,expected", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((1, -1, 1), 8, (1, 8, 1)), ((2, -1, 2), 8, (2, 2, 2)),
    ((2, 4, 1), 8, (2, 4, 1)), ((1, -1, 1), 256, (1, 256, 1))])
def test_mesh_shape_fills_the_rest(sizes, devices, expected):
  assert sharding.mesh_shape(mesh_config(*sizes), devices) == expected


@pytest.mark.parametrize("sizes,devices", [((-1, -1, 1), 8), ((3, -1, 1), 8), ((2, 2, 1), 8)])
def test_mesh_shape_errors(sizes, devices):
  with pytest.raises(ValueError, match="mesh|Mesh"):
    sharding.mesh_shape(mesh_config(*sizes), devices)


def test_make_mesh_on_one_device():
  mesh = sharding.make_mesh(mesh_config(-1, 1, 1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_fit_to_shape_replicates_dims_the_axes_do_not_divide():
  mesh = abstract_mesh(2, 2, 2)
  spec = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  assert sharding.fit_to_shape(spec, (8, 6)).spec == spec.spec
  assert sharding.fit_to_shape(spec, (6, 6)).spec == P(None, "tensor")
  assert sharding.fit_to_shape(spec, (8, 5)).spec == P(("data", "fsdp"), None)


def _abstract_state_shardings(config, mesh):
  rules = sharding.rules_from_config(config)
  boxed = helpers.abstract_params(config)
  params = sharding.unbox_shapes(boxed)
  params_sh = sharding.param_shardings(boxed, mesh, rules)
  opt = jax.eval_shape(helpers.optimizer(config).init, params)
  return params, params_sh, opt, sharding.opt_state_shardings(opt, params, params_sh, mesh, rules)


def test_fsdp_splits_every_large_param_and_its_adam_moments():
  mesh = abstract_mesh(fsdp=8)
  params, params_sh, opt, opt_sh = _abstract_state_shardings(tiny_config(**SHARDED_OVERRIDES), mesh)
  for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(params_sh)):
    if x.size >= 4096:
      assert np.prod(sh.shard_shape(x.shape)) * 8 == x.size, (x.shape, sh.spec)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt)[0]]
  moments = [(p, x, sh) for p, x, sh in zip(paths, jax.tree.leaves(opt), jax.tree.leaves(opt_sh))
             if ".mu" in p or ".nu" in p]
  assert len(moments) == 2 * len(jax.tree.leaves(params))
  by_shape = {}
  for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(params_sh)):
    by_shape.setdefault(x.shape, set()).add(sh.spec)
  for path, x, sh in moments:
    assert sh.spec in by_shape[x.shape], path  # the moment sits like its param


def test_shampoo_state_is_sharded_like_params_and_block_statistics_over_fsdp():
  mesh = abstract_mesh(fsdp=8)
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((256, 512), jnp.float32)},
            "scale": jax.ShapeDtypeStruct((512,), jnp.float32)}
  params_sh = {"dense": {"kernel": NamedSharding(mesh, P("fsdp", None))},
               "scale": NamedSharding(mesh, P("fsdp"))}
  opt = jax.eval_shape(shampoo.shampoo(1e-3, block_size=128).init, params)
  opt_sh = sharding.opt_state_shardings(opt, params, params_sh, mesh, RULES)
  kernel, kernel_sh = opt.stats["dense"]["kernel"], opt_sh.stats["dense"]["kernel"]
  for name in ("diagonal_statistics", "diagonal_momentum", "momentum"):
    assert getattr(kernel_sh, name).spec == P("fsdp", None), name
  for name in ("statistics", "preconditioners"):  # (num_blocks, b, b): split num_blocks
    x, sh = getattr(kernel, name), getattr(kernel_sh, name)
    assert x.ndim == 3 and sh.spec == P("fsdp")
    assert np.prod(sh.shard_shape(x.shape)) * 8 == x.size
  assert opt_sh.count.spec == P()


@pytest.mark.parametrize("shape,expected", [
    ((24, 128, 128), P("fsdp")), ((3, 128, 128), P(None, "fsdp")), ((3, 5, 7, 41), P()),
    ((16, 16), P()),  # below MIN_SHARDED_STATE_SIZE: replicated
    ((), P())])
def test_non_param_state_sharding_first_divisible_axis(shape, expected):
  leaf = jax.ShapeDtypeStruct(shape, jnp.float32)
  assert sharding.non_param_state_sharding(leaf, abstract_mesh(fsdp=8), "fsdp").spec == expected
  assert sharding.non_param_state_sharding(leaf, abstract_mesh(8, 1, 1), "fsdp").spec == P()


def test_bytes_per_device():
  mesh = abstract_mesh(fsdp=8)
  tree = {"a": jax.ShapeDtypeStruct((64, 8), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.int32)}
  shardings = {"a": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}
  assert sharding.bytes_per_device(tree, shardings) == 8 * 8 * 4 + 3 * 4


def run_subprocess(args, env_flags: str, timeout: int = 900):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": env_flags, "WANDB_MODE": "disabled"}
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode in (0, 1), result.stderr[-3000:]
  return result


def run_meshes(meshes: str) -> dict:
  """3 train steps on 1 device and on each "data,fsdp,tensor" mesh of 8 devices."""
  result = run_subprocess(["-m", "tests.multihost_worker", "meshes", f"--meshes={meshes}"],
                          f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fsdp_and_3d():
  """fsdp=8 (the cappa presets' layout) and data=fsdp=tensor=2: the fast suite's share."""
  return run_meshes("1,8,1;2,2,2")


@pytest.fixture(scope="module")
def other_meshes():
  return run_meshes("8,1,1;2,4,1")


def check_matches_one_device(report):
  reference = report["reference"]
  assert reference[0] != reference[-1]  # the params did move
  for mesh, run in report["meshes"].items():
    np.testing.assert_allclose(run["losses"], reference, atol=1e-5, rtol=0, err_msg=mesh)
    assert run["max_param_diff"] < 1e-5, mesh


def check_activation_constraints(report):
  # At least a residual-stream and an MLP constraint in the encoder and the decoder block,
  # forward and backward: the batch over (data, fsdp), the MLP features over tensor.
  for mesh, run in report["meshes"].items():
    residual = run["constraints"].count('[{"data", "fsdp"}, {}, {}]')
    mlp = run["constraints"].count('[{"data", "fsdp"}, {}, {"tensor"}]')
    assert residual >= 4 and mlp >= 4, (mesh, run["constraints"])


def test_fsdp_and_3d_meshes_match_one_device(fsdp_and_3d):
  check_matches_one_device(fsdp_and_3d)


def test_fsdp8_splits_params_and_adam_moments(fsdp_and_3d):
  split = fsdp_and_3d["meshes"]["1,8,1"]["split"]
  assert len(split["params"]) >= 10 and len(split["opt_state"]) == 2 * len(split["params"])
  for name, fraction in {**split["params"], **split["opt_state"]}.items():
    assert fraction == 1 / 8, name


def test_activation_constraints_reach_the_compiled_step(fsdp_and_3d):
  check_activation_constraints(fsdp_and_3d)


@pytest.mark.slow
def test_data_parallel_and_2x4_meshes_match_one_device(other_meshes):
  check_matches_one_device(other_meshes)
  check_activation_constraints(other_meshes)


@pytest.mark.slow
def test_plan_pod_on_a_tiny_config():
  result = run_subprocess(
      ["tools/plan_pod.py", "--config=shapes_tiny", "--devices=8", "--config.mesh.data=2",
       "--config.mesh.fsdp=-1", "--config.model.enc_depth=1", "--config.model.dec_depth=1"],
      FAST_COMPILE)
  out = result.stdout
  assert result.returncode == 0, out + result.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1} on 8 devices" in out
  assert "fits" in out and "step time" in out and "XLA cost_analysis" in out


@pytest.mark.slow
def test_batch_and_shampoo_statistics_follow_custom_rules_on_8_devices():
  """The rules are the one road to the mesh: moving act_batch / opt_stats moves both."""
  result = run_subprocess(["-m", "tests.multihost_worker", "rules"],
                          f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  default, custom = report["default"], report["custom"]
  assert default["batch_specs"] == ["P(('data', 'fsdp'),)"]
  assert default["batch_fraction"] == [1 / 8, 1 / 8]
  assert custom["batch_specs"] == ["P('data',)"]
  assert custom["batch_fraction"] == [1 / 4, 1 / 4]
  assert default["num_stats"] == custom["num_stats"] > 0
  assert all("'fsdp'" in spec for spec in default["stats_specs"]), default
  assert default["stats_fraction"] == [1 / 2]
  assert all("'data'" in spec and "fsdp" not in spec for spec in custom["stats_specs"]), custom
  assert custom["stats_fraction"] == [1 / 4]
