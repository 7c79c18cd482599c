"""Never lose a run: exact resume after SIGKILL, SIGTERM / Ctrl-C stops, corrupt
checkpoints, config mismatches, a full disk and non-finite steps, all through
`python -m capjax.train`."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from capjax import checkpoint, train, workdir as workdir_lib
from tests import train_cli

NUM_STEPS = 60  # long enough that a kill after the first checkpoint lands mid-run
STEP = "['step']"  # the step counter in `train_cli.saved_state`


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: checkpoints every 10 steps to NUM_STEPS, 2 grain threads."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  out = train_cli.run(workdir, **{"train.num_steps": NUM_STEPS, "data.num_threads": 2})
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def copy_run(reference, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  return workdir


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run_bitwise(reference, tmp_path):
  workdir, log = str(tmp_path / "run"), tmp_path / "killed.log"
  overrides = {"train.num_steps": NUM_STEPS, "data.num_threads": 2}
  proc = train_cli.start(workdir, log, **overrides)
  train_cli.wait_until(lambda: train_cli.steps(workdir), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  reached = train_cli.steps(workdir)
  assert reached[-1] < NUM_STEPS, f"the run finished before the kill ({reached})"

  out = train_cli.run(workdir, **overrides)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {reached[-1]}" in out.stderr
  assert train_cli.steps(workdir)[-1] == NUM_STEPS
  assert train_cli.bitwise_equal(train_cli.saved_state(workdir, NUM_STEPS),
                                 train_cli.saved_state(reference, NUM_STEPS))
  # Rows the killed run wrote past its checkpoint were dropped, then written again.
  assert ([r["step"] for r in train_cli.metrics(workdir)]
          == [r["step"] for r in train_cli.metrics(reference)])
  final = lambda rows: [r for r in rows if r["step"] == NUM_STEPS and "train/loss" in r][-1]
  assert (final(train_cli.metrics(workdir))["train/loss"]
          == final(train_cli.metrics(reference))["train/loss"])


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(NUM_STEPS), "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  out = train_cli.run(workdir, **{"train.num_steps": NUM_STEPS, "data.num_threads": 2})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "could not be restored" in out.stderr
  assert f"resumed from step {NUM_STEPS - 10}" in out.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{NUM_STEPS}.corrupt"))
  assert train_cli.bitwise_equal(train_cli.saved_state(workdir, NUM_STEPS),
                                 train_cli.saved_state(reference, NUM_STEPS))


@pytest.mark.slow
def test_model_size_mismatch_is_a_one_line_error(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  out = train_cli.run(workdir, **{"train.num_steps": NUM_STEPS, "model.width": 48})
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"error: Checkpoint \S+ does not match the config: params/\S+ is "
                      r"\([\d, ]+\) in the checkpoint but \([\d, ]+\) in the config\.", last), last
  assert train_cli.steps(workdir) == train_cli.steps(reference)  # nothing moved or written


@pytest.mark.slow
def test_a_data_pipeline_change_is_a_one_line_refusal_that_renames_nothing(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  out = train_cli.run(workdir, **{"train.num_steps": NUM_STEPS, "data.num_threads": 2,
                                  "data.num_workers": 2})
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"error: Checkpoint \S+/{NUM_STEPS} has a data-iterator state that does "
                      r"not fit this input pipeline \(.+\); data.num_workers .+\.", last), last
  assert "Traceback" not in out.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(
      os.listdir(os.path.join(reference, "checkpoints")))  # nothing set aside
  assert train_cli.metrics(workdir) == train_cli.metrics(reference)  # the history is kept


@pytest.mark.slow
def test_a_checkpoint_that_lost_its_data_position_is_not_resumed_as_exact(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", str(NUM_STEPS), "data", "process_0-of-1.json"))
  out = train_cli.run(workdir, **{"train.num_steps": NUM_STEPS, "data.num_threads": 2})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "process_0-of-1.json is missing" in out.stderr
  assert f"resumed from step {NUM_STEPS - 10}" in out.stderr
  assert train_cli.bitwise_equal(train_cli.saved_state(workdir, NUM_STEPS),
                                 train_cli.saved_state(reference, NUM_STEPS))


# Runs the trainer with a disk that fills up while checkpoint {step} is written: orbax's JSON
# writer (the `meta` and `config` items) fails with ENOSPC in that step's temporary directory.
FULL_DISK_AT = """
import errno, sys
import orbax.checkpoint as ocp
from capjax import train
write = ocp.JsonCheckpointHandler._save_fn
async def full_disk(self, x, directory):
  if "/{step}." in str(directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))
  return await write(self, x, directory)
ocp.JsonCheckpointHandler._save_fn = full_disk
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_in_one_line_and_the_rerun_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = {"train.num_steps": 30, "checkpoint.every": 10}
  cmd = train_cli.command(workdir, **overrides)
  full = subprocess.run([sys.executable, "-c", FULL_DISK_AT.replace("{step}", "20"), *cmd[3:]],
                        cwd=train_cli.ROOT, env=train_cli.env(), capture_output=True, text=True,
                        timeout=600)
  assert full.returncode != 0
  last = full.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"error: Could not save checkpoint \S+/20 \(.*No space left on "
                      r"device.*\); it is incomplete and will be ignored: rerun to resume from "
                      r"the newest complete one\.", last), full.stderr[-3000:]
  # Nothing that looks complete but fails to restore: step 20 was never committed.
  assert train_cli.steps(workdir) == [10]
  ckpt_dir = workdir_lib.checkpoints(workdir)
  assert checkpoint.verify_files(ckpt_dir / "10")

  out = train_cli.run(workdir, **overrides)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 10" in out.stderr
  assert train_cli.steps(workdir) == [10, 20, 30]
  assert all(checkpoint.verify_files(ckpt_dir / str(step)) for step in (20, 30))


@pytest.mark.parametrize("sig, code", [
    (signal.SIGTERM, train.EXIT_STOPPED), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_a_checkpoint_at_the_step_reached(tmp_path, sig, code):
  workdir, log = str(tmp_path / "run"), tmp_path / "run.log"
  proc = train_cli.start(workdir, log, **{"train.num_steps": 100_000, "checkpoint.every": 0,
                                          "train.log_every": 5})
  metrics = os.path.join(workdir, "metrics.jsonl")
  train_cli.wait_until(lambda: os.path.exists(metrics) and os.path.getsize(metrics), proc)
  proc.send_signal(sig)
  assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
  name = signal.Signals(sig).name
  found = re.search(rf"received {name} at step (\d+); saved checkpoint", log.read_text())
  assert found, log.read_text()[-3000:]
  step = int(found.group(1))
  assert step >= 5 and train_cli.steps(workdir) == [step]
  assert int(train_cli.saved_state(workdir, step)[STEP]) == step


@pytest.mark.slow
def test_nan_batch_in_skip_mode_skips_exactly_that_update(tmp_path):
  workdir = str(tmp_path / "run")
  out = train_cli.run(workdir, **{"train.num_steps": 6, "train.inject_nan_at_step": 4,
                                  "checkpoint.every": 1, "train.log_every": 2})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "skipped the non-finite update of step(s) [4]" in out.stderr
  before, at, after = (train_cli.saved_state(workdir, s) for s in (3, 4, 5))
  # The step counter advances past the skipped update (its batch is consumed) ...
  assert int(at[STEP]) == 4
  # ... while params and optimizer state stay exactly as they were before it.
  assert train_cli.bitwise_equal({k: v for k, v in at.items() if k != STEP},
                                 {k: v for k, v in before.items() if k != STEP})
  assert not train_cli.bitwise_equal(after, at)
  rows = {r["step"]: r for r in train_cli.metrics(workdir) if "train/loss" in r}
  assert rows[2]["train/skipped_steps"] == 0 and rows[4]["train/skipped_steps"] == 1
  assert rows[6]["train/skipped_steps"] == 1 and rows[6]["train/nonfinite"] == 0


@pytest.mark.slow
def test_nan_batch_in_stop_mode_stops_naming_the_step(tmp_path):
  workdir = str(tmp_path / "run")
  out = train_cli.run(workdir, **{"train.num_steps": 10, "train.inject_nan_at_step": 4,
                                  "train.nonfinite": "stop", "checkpoint.every": 2,
                                  "train.log_every": 5})
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Non-finite loss or gradient at step 4"), last
  assert "last good checkpoint: step 2" in last
  assert train_cli.steps(workdir) == [2]  # nothing saved after the bad step


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_a_skip_mode_run(tmp_path):
  workdir = str(tmp_path / "run")
  out = train_cli.run(workdir, **{"train.num_steps": 20, "train.inject_nan_at_step": 4,
                                  "train.inject_nan_steps": 100, "train.max_consecutive_skips": 5,
                                  "checkpoint.every": 2, "train.log_every": 2})
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"error: Non-finite loss or gradient at 5 steps in a row, up to step 8 "
                      r"\(train.max_consecutive_skips=5\); last good checkpoint: step 6 in \S+\.",
                      last), last


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(workdir, tmp_path, tag: str, **overrides) -> list:
  port = free_port()
  procs = []
  for i in range(2):
    cmd = train_cli.command(workdir, **overrides) + [
        f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(train_cli.start_command(cmd, tmp_path / f"{tag}_{i}.log"))
  return procs


def wait_all(procs, timeout: float = 300) -> list[int]:
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = {"checkpoint.every": 0, "train.log_every": 5}
  procs = start_two_processes(workdir, tmp_path, "first", **overrides,
                              **{"train.num_steps": 100_000})
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    train_cli.wait_until(lambda: os.path.exists(metrics) and os.path.getsize(metrics), procs[0])
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one host only
  finally:
    codes = wait_all(procs)
  assert codes == [train.EXIT_STOPPED] * 2  # saved, not finished
  log = (tmp_path / "first_0.log").read_text()
  found = re.search(r"received SIGTERM at step (\d+); saved checkpoint", log)
  assert found, log[-3000:]
  step = int(found.group(1))
  assert train_cli.steps(workdir) == [step]
  data_files = os.listdir(os.path.join(workdir, "checkpoints", str(step), "data"))
  assert sorted(f for f in data_files if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]  # each process's input position

  procs = start_two_processes(workdir, tmp_path, "second", **overrides,
                              **{"train.num_steps": step + 2})
  assert wait_all(procs) == [0, 0]
  assert f"resumed from step {step}" in (tmp_path / "second_0.log").read_text()
  assert train_cli.steps(workdir) == [step, step + 2]
