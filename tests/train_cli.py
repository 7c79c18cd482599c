"""Runs `python -m capjax.train` on a tiny shapes model in a subprocess, for the CLI tests."""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.enc_depth": 1,
        "model.dec_depth": 1, "model.num_registers": 2, "data.image_size": 32,
        "train.batch_size": 16, "train.log_every": 10, "eval.every": 0,
        "eval.num_examples": 32, "eval.batch_size": 32, "eval.num_captions": 1,
        "checkpoint.every": 10, "checkpoint.keep": 0, "dtype": "float32",
        "optimizer.name": "adamw", "optimizer.b2": 0.999, "schedule.peak_lr": 2e-3}  # helpers.ADAMW
# Compiled steps are cached across the test runs (same program, same machine code).
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"capjax-test-jax-cache-{os.getuid()}")


def env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
          "PYTHONUNBUFFERED": "1", "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def command(workdir, **overrides) -> list[str]:
  args = {**TINY, **overrides}
  return [sys.executable, "-m", "capjax.train", "--config=shapes_tiny", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in args.items())]


def run(workdir, timeout: float = 600, **overrides) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, **overrides), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def start_command(cmd: list[str], log_path) -> subprocess.Popen:
  """Starts `cmd` in the background, its stderr going to `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=log)


def start(workdir, log_path, **overrides) -> subprocess.Popen:
  return start_command(command(workdir, **overrides), log_path)


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.02):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"run exited ({proc.returncode}) before the condition held")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(poll)


def steps(workdir) -> list[int]:
  """Committed checkpoint steps (orbax renames a finished checkpoint to its step number)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def saved_state(workdir, step: int) -> dict[str, np.ndarray]:
  """{"params/...": array} of everything a checkpoint's train state holds, as stored."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def bitwise_equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
