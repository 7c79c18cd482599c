"""`python -m capjax.evaluate --workdir=DIR --eval=NAME [--step=N] [--data.KEY=V ...] [--OPTION=V ...]`

Runs one evaluator (`capjax.evals`) on a trained model and prints one JSON object of metrics on
stdout; progress and samples go to stderr. `--data.KEY=V` overrides the model's saved data
config (e.g. `--data.name=imagefolder --data.dir=D`); every other `--OPTION=V` is an option of
the evaluator (`--help` with `--eval=NAME` lists them).
"""

import argparse
import dataclasses
import json
import sys

from capjax import config as config_lib, evals, trained as trained_lib


def split_args(rest: list[str]) -> tuple[list[str], list[str]]:
  """(`--data.KEY=V` config overrides as `--config.data.KEY=V`, the evaluator's options)."""
  data = [f"--config.{a[2:]}" for a in rest if a.startswith("--data.")]
  return data, [a for a in rest if not a.startswith("--data.")]


def with_data_overrides(trained, overrides: list[str]):
  config = trained.config.copy_and_resolve_references()
  for arg in overrides:
    config_lib.apply_override(config, *config_lib.split_override(arg))
  config_lib.validate(config)
  return dataclasses.replace(trained, config=config)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
  parser.add_argument("--workdir")
  parser.add_argument("--eval", default="attributes")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--help", action="store_true")
  args, rest = parser.parse_known_args(argv)
  try:
    if args.help or not args.workdir:
      options = " ".join(f"--{k}={v}" for k, v in evals.options(args.eval).items())
      print(f"{__doc__.splitlines()[0]}\n--eval={args.eval} options: {options}", file=sys.stderr)
      sys.exit(0 if args.help else 2)
    data_overrides, option_args = split_args(rest)
    options = evals.parse_options(args.eval, option_args)
    trained = with_data_overrides(trained_lib.load(args.workdir, args.step), data_overrides)
    metrics = evals.run(args.eval, trained, **options)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(metrics))


if __name__ == "__main__":
  main()
