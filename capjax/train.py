"""`python -m capjax.train --config=NAME --workdir=DIR [--config.a.b=value ...]`

Trains, logs to DIR/metrics.jsonl (+ wandb, offline by default), evaluates and
checkpoints periodically. Rerunning the same command resumes exactly from the
newest complete checkpoint in DIR/checkpoints (params, optimizer state, step,
data position). SIGTERM or Ctrl-C: the current step finishes, a checkpoint is
saved, and the run exits (0 after SIGTERM, 130 after Ctrl-C).
"""

import argparse
import logging
import os
import sys
import time

import jax
import numpy as np
import optax

from capjax import checkpoint, config as config_lib, flops, metrics_log, setup as setup_lib
from capjax import stopping, workdir as workdir_lib
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
    raise ValueError(f"Tokenizer has {tok.vocab_size} pieces but model.vocab_size="
                     f"{config.model.vocab_size}; raise model.vocab_size.")
  return tok


def evaluate(run: setup_lib.Setup, params, tok):
  """The task's validation loss and a few generated captions beside their truths."""
  config = run.config
  generate = run.task.predict_fns().get("generate")
  losses, samples = [], []
  for batch in pipeline.eval_batches(config, tok, "val", config.eval.num_examples,
                                     config.eval.batch_size):
    losses.append(float(run.eval_step(params, {k: batch[k] for k in run.task.batch_spec(1)})))
    if generate is not None and len(samples) < config.eval.num_captions:
      n = config.eval.num_captions - len(samples)
      out = generate(params, batch["image"][:n])
      samples += [(tok.decode(o), r["captions"][0])
                  for o, r in zip(np.asarray(out), batch["records"])]
  return {"val/loss": float(np.mean(losses))}, samples


def restore_or_init(ckpt, run: setup_lib.Setup, data_iter):
  """(state, meta, restored step or None): the newest usable checkpoint, else a fresh state."""
  state, step, meta = ckpt.restore(run.abstract_state(), data_iter)
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


def train(config, workdir: str):
  """Trains to `train.num_steps`, resuming from DIR/checkpoints; returns (state, stop signal)."""
  if config.train.nonfinite not in ("skip", "stop"):
    raise config_lib.ConfigError(
        f"train.nonfinite must be 'skip' or 'stop', got {config.train.nonfinite!r}")
  stop = stopping.StopRequest()  # early: a SIGTERM during start-up still gets a clean stop
  tok = ensure_tokenizer(config, workdir)
  run = setup_lib.assemble(config, tok.special)
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir), config.checkpoint.every,
                                 config.checkpoint.keep, config.checkpoint.keep_period)
  dataset = pipeline.train_dataset(config, tok.path, jax.process_index(), jax.process_count())
  data_iter = iter(dataset)
  writer = None
  try:
    with run.context():
      state, meta, restored_step = restore_or_init(ckpt, run, data_iter)
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
      while step < config.train.num_steps:
        batch = run.global_batch(next(data_iter))
        state, metrics = run.train_step(state, batch)
        step += 1
        window_steps += 1
        nonfinite.add(step, metrics["train/nonfinite"])
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
          val, samples = evaluate(run, state.params, tok)
          writer.write(step, val)
          writer.message(f"step {step}: val/loss {val['val/loss']:.4f}")
          for generated, truth in samples:
            writer.message(f"  generated: {generated!r}   true: {truth!r}")
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
    stop.close()
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
    _, stopped_by = train(config, args.workdir)
  except (config_lib.ConfigError, checkpoint.CheckpointMismatchError,
          checkpoint.NoUsableCheckpointError, pipeline.DataNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except stopping.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if stopped_by == "SIGINT":
    sys.exit(130)  # the shell convention for Ctrl-C; the checkpoint is saved all the same


if __name__ == "__main__":
  main()
