"""Shampoo under FSDP on 8 simulated devices: its block statistics are split over the
devices, and the train steps match one device's."""

import os
import subprocess
import sys

import numpy as np
import pytest

from capjax import sharding
from tests import shampoo_sharded_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


pytestmark = pytest.mark.slow  # a subprocess on 8 simulated devices runs Shampoo

@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """(one device, 8 devices with fsdp=8) results of `worker.run`, same data and init."""
  tmp = tmp_path_factory.mktemp("shampoo_sharded")
  tok = worker.small_tokenizer(worker.shampoo_config(), str(tmp))
  out = tmp / "fsdp8.npz"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
  proc = subprocess.Popen(  # runs while this process computes the 1-device reference
      [sys.executable, "-m", "tests.shampoo_sharded_worker", str(out), tok.path, str(DEVICES)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  single = worker.run(tok.path, fsdp=1)
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log[-3000:]
  return single, dict(np.load(out))


def test_block_statistics_are_split_over_fsdp(results):
  _, sharded = results
  fractions = {k[len("fraction/"):]: float(v) for k, v in sharded.items()
               if k.startswith("fraction/")}
  blocks = {k[len("blocks/"):]: int(v) for k, v in sharded.items() if k.startswith("blocks/")}
  # (blocks, 16, 16) arrays: those big enough to be worth splitting, with a block count
  # fsdp divides, are split along their blocks.
  splittable = [name for name, n in blocks.items()
                if n % DEVICES == 0 and n * 16 * 16 >= sharding.MIN_SHARDED_STATE_SIZE]
  assert len(splittable) >= 6, blocks
  for name in splittable:
    assert fractions[name] == pytest.approx(1 / DEVICES), (name, fractions[name])


def test_three_steps_match_one_device(results):
  single, sharded = results
  params = [k for k in single if k.startswith("params/")]
  assert params and set(params) == {k for k in sharded if k.startswith("params/")}
  for name in params:
    np.testing.assert_allclose(sharded[name], single[name], rtol=0, atol=1e-5, err_msg=name)
  # The steps did move the params (Shampoo preconditioned from the first step on).
  assert any(np.abs(single[name]).max() > 0 for name in params)
