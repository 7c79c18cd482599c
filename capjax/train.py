"""`python -m capjax.train --config=NAME --workdir=DIR [--config.a.b=value ...]`

Trains, logs to DIR/metrics.jsonl (+ wandb, offline by default), evaluates and
checkpoints periodically. Rerunning the same command resumes exactly from the
newest complete checkpoint in DIR/checkpoints (params, optimizer state, step,
data position). SIGTERM or Ctrl-C: the current step finishes, a checkpoint is
saved, and the run exits (143 after SIGTERM before train.num_steps, 130 after Ctrl-C;
0 only when train.num_steps is reached). Exit 2: a config, data, tokenizer or workdir-lock
error (one line); exit 1: a non-finite step in train.nonfinite=stop mode.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import logging
import os
import sys
import time

import jax
import numpy as np
import optax

from capjax import captioner as captioner_lib, checkpoint, config as config_lib, evals, flops
from capjax import metrics_log, setup as setup_lib, sharding, stopping, tasks
from capjax import trained as trained_lib, workdir as workdir_lib
from capjax.data import pipeline, tokenizer as tokenizer_lib


def parse_args(argv):
  parser = argparse.ArgumentParser(description="Train a captioning model.")
  parser.add_argument("--config", default="shapes_tiny", help="configs/NAME.py or a path")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--coordinator", default=None, help="host:port, for multi-process runs")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  return parser.parse_known_args(argv)


def initialize_distributed(args):
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif os.environ.get("CAPJAX_MULTIHOST") == "1":  # TPU VMs: everything from the environment
    jax.distributed.initialize()


def ensure_tokenizer(config, workdir) -> tokenizer_lib.Tokenizer:
  """Uses `tokenizer.path` if set, else DIR/tokenizer.model, trained on first use."""
  path = str(workdir_lib.tokenizer(workdir, config))
  if not workdir_lib.path(path).exists() and jax.process_index() == 0:
    tokenizer_lib.train(pipeline.training_captions(config), path,
                        config.tokenizer.vocab_size, config.tokenizer.model_type)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("tokenizer")
  tok = tokenizer_lib.Tokenizer(path)
  if tok.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(f"Tokenizer has {tok.vocab_size} pieces but model.vocab_size="
                     f"{config.model.vocab_size}; raise model.vocab_size.")
  return tok


def evaluate(run: setup_lib.Setup, params, tok, step: int):
  """The task's validation loss and a few generated captions beside their truths."""
  config = run.config
  captioner = None
  if "generate" in run.task.predict_fns():  # the family captions
    captioner = captioner_lib.Captioner(trained_lib.Trained(config, run.task, params, tok, step))
  losses, samples = [], []
  for batch in pipeline.eval_batches(config, tok, "val", config.eval.num_examples,
                                     config.eval.batch_size):
    # Images and tokens (also where training reads stored features: the task runs its tower).
    losses.append(float(run.eval_step(params, {k: v for k, v in batch.items()
                                               if k != "records"})))
    if captioner is not None and len(samples) < config.eval.num_captions:
      n = config.eval.num_captions - len(samples)
      samples += [(c[0], r["captions"][0])
                  for c, r in zip(captioner.captions(batch["image"][:n]), batch["records"])]
  return {"val/loss": float(np.mean(losses))}, samples


def restore_or_init(ckpt, run: setup_lib.Setup, data_iter):
  """(state, meta, restored step or None): the newest usable checkpoint, else a fresh state."""
  state, step, meta = ckpt.restore(
      run.abstract_state(), data_iter,
      allow_data_restart=run.config.checkpoint.allow_data_restart)
  if state is None:
    state = run.init_state()
  return state, meta, step


def check_nonfinite(nonfinite, config, writer, ckpt):
  """Reports the steps whose update was skipped since the last check (a host sync)."""
  bad = nonfinite.flush()
  if not bad:
    return
  stop_mode = config.train.nonfinite == "stop"
  limit = config.train.max_consecutive_skips
  if stop_mode or (limit and nonfinite.consecutive >= limit):
    ckpt.wait()
    last = ckpt.latest_step()
    last = f"step {last} in {ckpt.directory}" if last is not None else "none saved yet"
    what = (f"at step {bad[0]} (train.nonfinite=stop)" if stop_mode else
            f"at {nonfinite.consecutive} steps in a row, up to step {bad[-1]} "
            f"(train.max_consecutive_skips={limit})")
    raise stopping.NonFiniteError(
        f"Non-finite loss or gradient {what}; last good checkpoint: {last}.")
  writer.message(f"skipped the non-finite update of step(s) {bad}; "
                 f"{nonfinite.skipped} skipped in this run so far")


# The loop waits for step N-2's outputs before dispatching step N: the device always has the
# next step queued, and a stop request is acted on within about two steps of its arrival.
MAX_STEPS_IN_FLIGHT = 2
EXIT_STOPPED = 143  # stopped by SIGTERM before train.num_steps, checkpoint saved (128 + 15)


def check_restart(config, workdir, restored_step):
  """Refuses to start from step 0 over an earlier run's checkpoints or metrics."""
  if restored_step is not None or config.train.allow_restart:
    return
  ckpt_dir, metrics = workdir_lib.checkpoints(workdir), workdir_lib.metrics(workdir)
  leftovers = [str(p) for p in (ckpt_dir, metrics)
               if p.exists() and (p.is_file() and p.stat().length or
                                  p.is_dir() and any(p.iterdir()))]
  if leftovers:
    raise config_lib.ConfigError(
        f"{workdir} holds an earlier run ({', '.join(leftovers)}) but no checkpoint to resume "
        "from; set --config.train.allow_restart=True to start over from step 0 (its metrics are "
        "replaced), or use a new --workdir.")


def next_batch(fetch, stop, dataset, timeout_s: float) -> dict:
  """The next batch from `fetch` (a single-thread executor's `submit(next, iterator)`), polled
  so that a stop signal is honoured and a pipeline that yields nothing fails in bounded time."""
  future, waited = fetch(), 0.0
  while True:
    try:
      return future.result(timeout=1.0)
    except concurrent.futures.TimeoutError:
      waited += 1.0
    if stop.signal_name is not None:
      raise stopping.StopWhileWaiting(f"received {stop.signal_name} while waiting for data")
    if waited >= timeout_s:
      skips = pipeline.skip_metrics(dataset)
      raise pipeline.DataNotFoundError(
          f"no training batch came out of the input pipeline in {waited:.0f} s "
          f"(data.timeout_s); skipped so far: {skips or 'nothing'}.")


def train(config, workdir: str):
  """Trains to `train.num_steps`, resuming from DIR/checkpoints; returns (state, stop signal).

  Holds DIR's lock while it runs: a second trainer on the same workdir is refused."""
  if config.train.nonfinite not in ("skip", "stop"):
    raise config_lib.ConfigError(
        f"train.nonfinite must be 'skip' or 'stop', got {config.train.nonfinite!r}")
  sharding.check_devices(config, jax.device_count())  # before the workdir is written to
  # The stop handlers go in early: a SIGTERM during start-up still gets a clean stop.
  with workdir_lib.lock(workdir), contextlib.closing(stopping.StopRequest()) as stop:
    return _train(config, workdir, stop)


def _train(config, workdir: str, stop: stopping.StopRequest):
  config = tasks.prepare_run(config, workdir)  # e.g. a pretrained tower's sizes
  tok = ensure_tokenizer(config, workdir)
  run = setup_lib.assemble(config, tok.special)
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir), config.checkpoint.every,
                                 config.checkpoint.keep, config.checkpoint.keep_period)
  dataset = pipeline.train_dataset(config, tok.path, jax.process_index(), jax.process_count())
  data_iter = iter(dataset)
  fetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="capjax-data")
  fetch = lambda: fetcher.submit(next, data_iter)
  writer = None
  try:
    with run.context():
      state, meta, restored_step = restore_or_init(ckpt, run, data_iter)
      check_restart(config, workdir, restored_step)
      step = int(state.step)
      nonfinite = stopping.NonfiniteSteps(meta.get("skipped_steps", 0))
      param_norm = jax.jit(optax.tree.norm)  # at log steps only: a pass over all params
      writer = metrics_log.MetricsWriter(workdir, config, config.train.num_steps, step)
      if restored_step is not None:
        writer.message(f"resumed from step {restored_step}")
      flops_per_step = config.train.batch_size * run.task.flops_per_example()
      peak, peak_source = flops.peak_flops_per_device()
      peak *= jax.device_count()
      writer.message(f"{jax.device_count()} devices, mesh {dict(run.mesh.shape)}, "
                     f"peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")
      window_start, window_steps = time.perf_counter(), 0
      in_flight = collections.deque()
      while step < config.train.num_steps:
        batch = run.global_batch(next_batch(fetch, stop, dataset, config.data.timeout_s))
        state, metrics = run.train_step(state, batch)
        step += 1
        window_steps += 1
        nonfinite.add(step, metrics["train/nonfinite"])
        in_flight.append(metrics["train/nonfinite"])
        if len(in_flight) > MAX_STEPS_IN_FLIGHT:
          in_flight.popleft().block_until_ready()
        log_step = step % config.train.log_every == 0 or step == config.train.num_steps
        if log_step:
          # The host syncs here, once per log_every steps.
          metrics = jax.device_get({**metrics, "train/param_norm": param_norm(state.params)})
          check_nonfinite(nonfinite, config, writer, ckpt)
          elapsed = time.perf_counter() - window_start
          step_time = elapsed / window_steps
          metrics["train/skipped_steps"] = nonfinite.skipped
          metrics["perf/examples_per_s"] = config.train.batch_size / step_time
          metrics["perf/mfu"] = flops_per_step / step_time / peak
          metrics["perf/step_time_s"] = step_time
          metrics.update(pipeline.skip_metrics(dataset))  # data/skipped_<reason>, this process
          writer.write(step, metrics)
          writer.progress(step, metrics)
          window_start, window_steps = time.perf_counter(), 0
        if config.eval.every > 0 and (step % config.eval.every == 0
                                      or step == config.train.num_steps):  # 0: never
          val, samples = evaluate(run, state.params, tok, step)
          writer.write(step, val)
          writer.message("\n".join([f"step {step}: val/loss {val['val/loss']:.4f}"] + [
              f"  generated: {generated!r}   true: {truth!r}" for generated, truth in samples]))
          window_start = time.perf_counter()
        for name in evals.due(config, step):  # config.evals
          trained = trained_lib.Trained(config, run.task, state.params, tok, step)
          results = evals.run_configured(name, trained)
          writer.write(step, results)
          writer.message(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
          window_start = time.perf_counter()
        stopping_now = stop.should_stop(step, log_step)
        if ckpt.should_save(step) or step == config.train.num_steps or stopping_now:
          check_nonfinite(nonfinite, config, writer, ckpt)
          ckpt.save(step, state, data_iter, config, {"skipped_steps": nonfinite.skipped})
        if stopping_now:
          ckpt.wait()
          writer.message(f"received {stop.signal_name} at step {step}; saved checkpoint "
                         f"{ckpt.directory / str(step)}")
          break
  finally:
    fetcher.shutdown(wait=False, cancel_futures=True)
    ckpt.close()  # waits for a save in flight: a finished step is never lost
    if writer is not None:
      writer.close()
  return state, stop.signal_name


def main(argv=None):
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = config_lib.load(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  initialize_distributed(args)
  try:
    state, stopped_by = train(config, args.workdir)
  except (config_lib.ConfigError, checkpoint.CheckpointMismatchError,
          checkpoint.NoUsableCheckpointError, pipeline.DataNotFoundError,
          tokenizer_lib.TokenizerError, workdir_lib.WorkdirLockedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (stopping.NonFiniteError, checkpoint.CheckpointSaveError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except stopping.StopWhileWaiting as e:
    print(f"error: {e}; nothing saved since the last checkpoint", file=sys.stderr)
    sys.exit(EXIT_STOPPED)
  if stopped_by == "SIGINT":
    sys.exit(130)  # the shell convention for Ctrl-C; the checkpoint is saved all the same
  if stopped_by and int(state.step) < config.train.num_steps:
    sys.exit(EXIT_STOPPED)  # saved, not finished: schedulers must not take it for done


if __name__ == "__main__":
  main()
