"""Run a task's frozen vision tower once over a dataset split and store its features.

  python tools/precompute_features.py --config=NAME --workdir=DIR [--split=train] \
      [--output=DIR/features] [--num_examples=N] [--batch_size=64] [--num_shards=1] \
      [--config.KEY=VALUE ...]

Then train from them with the same config and workdir plus `--config.data.features=OUTPUT`
(`capjax/data/features.py`; seed 002's practice). The tower is the one that run starts from:
`init.vision` when set, else the random init of `seed` (`Task.prepare_run` and the run's own
init, as `capjax.train` makes them; a workdir with a checkpoint gives its params). Images are
preprocessed as for evaluation. The first N items of the split (default: all) are stored in
index order, unreadable ones as skip markers. Exit 2: a config, data or output error (one line).
"""

import argparse
import sys
import time

import numpy as np


def _features(task, params, source, preprocess, n: int, batch_size: int, progress):
  """(features float32 array, raw captions) or (None, skip reason) for items 0..n-1."""
  from capjax.data import transforms  # pylint: disable=g-import-not-at-top
  encode = task.predict_fns()["encode_images"]
  for start in range(0, n, batch_size):
    items = []
    for i in range(start, min(n, start + batch_size)):
      before = sum(source.skips.as_dict().values()) if hasattr(source, "skips") else 0
      record = source[i]
      if record is None:
        reasons = source.skips.as_dict() if hasattr(source, "skips") else {}
        items.append((None, max(reasons, key=reasons.get) if sum(reasons.values()) > before
                      else "unreadable"))
      else:
        items.append((transforms.to_square(record["image"], preprocess.image_size,
                                           preprocess.resize), record["captions"]))
    good = [image for image, _ in items if image is not None]
    if good:
      padded = np.stack(good + [good[-1]] * (batch_size - len(good)))  # one compile
      out = iter(np.asarray(encode(params, padded))[:len(good)])
    for image, captions in items:
      yield (None, captions) if image is None else (next(out), captions)
    progress(min(n, start + batch_size))


def precompute(config, workdir: str, split: str, output: str, num_examples: int = 0,
               batch_size: int = 64, num_shards: int = 1, progress=lambda done: None) -> int:
  """Stores the features of the first `num_examples` (0: all) items of `split` in `output`
  for the run `config` trains in `workdir`; returns the count."""
  # pylint: disable=g-import-not-at-top
  import jax
  from capjax import config as config_lib, setup as setup_lib, tasks, trained
  from capjax import workdir as workdir_lib
  from capjax.data import features, pipeline, registry
  from capjax.data import tokenizer as tokenizer_lib
  config = tasks.prepare_run(config, workdir)
  task_cls = type(tasks.get(config, tokenizer_lib.SENTENCEPIECE_IDS))
  if not hasattr(task_cls, "feature_shape"):
    raise config_lib.ConfigError(f"task={config.task} has no frozen tower to precompute.")
  if workdir_lib.checkpoints(workdir).exists():
    model = trained.load(workdir)
    task, params = model.task, model.params
  else:  # the params the run starts from: its init, with init.vision loaded
    run = setup_lib.assemble(config, tokenizer_lib.SENTENCEPIECE_IDS)
    with run.context():
      params = jax.device_get(run.init_state().params)
    task = run.task
  source = registry.get_source(config.data, split)
  n = min(num_examples or len(source), len(source))
  examples = _features(task, params, source, pipeline.Preprocess.from_config(config), n,
                       batch_size, progress)
  return features.write_split(output, split, examples, n, task_cls.feature_shape(config),
                              features.tower_description(config), num_shards)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py or a path")
  parser.add_argument("--workdir", required=True, help="the run the features are for")
  parser.add_argument("--split", default="train")
  parser.add_argument("--output", default=None, help="default: WORKDIR/features")
  parser.add_argument("--num_examples", type=int, default=0, help="0: the whole split")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_shards", type=int, default=1)
  args, overrides = parser.parse_known_args(argv)
  # pylint: disable=g-import-not-at-top  # after --help
  from capjax import config as config_lib, workdir as workdir_lib
  from capjax.data import images
  output = args.output or str(workdir_lib.path(args.workdir) / "features")
  started = time.perf_counter()
  try:
    config = config_lib.load(args.config, overrides + ["--config.data.features="])
    count = precompute(config, args.workdir, args.split, output, args.num_examples,
                       args.batch_size, args.num_shards,
                       lambda done: print(f"\r{done} images", end="", file=sys.stderr,
                                          flush=True))
  except (config_lib.ConfigError, images.DataNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  seconds = time.perf_counter() - started
  print(f"\nwrote {count} {args.split} features to {output} in {seconds:.1f} s "
        f"({count / seconds:.1f} images/s); train with --config.data.features={output}",
        file=sys.stderr)


if __name__ == "__main__":
  main()
