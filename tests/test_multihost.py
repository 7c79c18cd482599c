"""Two local processes x 4 CPU devices under jax.distributed, against one process on 1 device.

Each process feeds only the examples its own input pipeline read (the source
sliced `[process_index::process_count]`); the global batch is assembled with
`jax.make_array_from_process_local_data`. The first pixel of every image holds
its source index (tests/multihost_worker.py), so the test sees exactly which
examples each process consumed.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from capjax.data import pipeline, tokenizer as tokenizer_lib
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Faster XLA:CPU compiles; results are unchanged (no fast-math either way).
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
TIMEOUT_S = 600

pytestmark = pytest.mark.slow  # two processes start JAX and train: the slow suite


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE,
          "WANDB_MODE": "disabled"}


def worker_command(mode: str, *args: str) -> list[str]:
  return [sys.executable, "-m", "tests.multihost_worker", mode, *args]


def last_json_line(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs both processes (concurrently) and the 1-process reference; their JSON reports."""
  tmp = tmp_path_factory.mktemp("multihost")
  tok = str(tmp / "tokenizer.model")
  tokenizer_lib.train(pipeline.training_captions(tiny_config(), max_images=500), tok, 64, "word")
  out = tmp / "out"
  out.mkdir()
  args = [f"--port={free_port()}", "--num_processes=2", f"--tokenizer={tok}", f"--out={out}"]
  procs = [subprocess.Popen(worker_command("process", *args, f"--process_id={i}"), cwd=ROOT,
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  reference = subprocess.run(worker_command("reference", *args), cwd=ROOT, env=worker_env(),
                             capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert reference.returncode == 0, reference.stderr[-3000:]
  processes = sorted((last_json_line(o) for o, _ in outputs), key=lambda r: r["process_index"])
  return {"processes": processes, "reference": last_json_line(reference.stdout), "out": out}


def test_two_processes_span_one_mesh(runs):
  for i, report in enumerate(runs["processes"]):
    assert report["process_index"] == i and report["process_count"] == 2
    assert report["local_devices"] == 4 and report["devices"] == 8
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


def test_same_loss_and_params_as_one_process(runs):
  reference = runs["reference"]["losses"]
  for report in runs["processes"]:
    np.testing.assert_allclose(report["losses"], reference, atol=1e-5, rtol=0)
  assert reference[0] != reference[-1]  # the steps did train
  got, want = np.load(runs["out"] / "params.npz"), np.load(runs["out"] / "reference_params.npz")
  assert sorted(got.files) == sorted(want.files)
  for name in want.files:
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)


def test_each_process_reads_only_its_slice(runs):
  seen = []
  for i, report in enumerate(runs["processes"]):
    indices = [j for batch in report["indices"] for j in batch]
    assert len(indices) == 3 * 8  # 3 steps x (global batch 16 / 2 processes)
    assert all(j % 2 == i for j in indices), indices
    assert report["indices"] == runs["reference"]["indices"][i]
    seen.append(set(indices))
  assert not seen[0] & seen[1]


def test_only_process_zero_writes_metrics(runs):
  rows = [json.loads(line) for line in (runs["out"] / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert [r["train/loss"] for r in rows] == pytest.approx(runs["processes"][0]["losses"])
