"""`python -m capjax.evaluate --workdir=DIR --eval=NAME [--split=test] [--num_examples=N]`

Prints one JSON object of metrics on stdout; progress and samples go to stderr.
"""

import argparse
import json
import sys

from capjax import evals, trained as trained_lib


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--eval", default="attributes")
  parser.add_argument("--split", default="test")
  parser.add_argument("--num_examples", type=int, default=256)
  parser.add_argument("--show", type=int, default=8, help="samples printed to stderr")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  args = parser.parse_args(argv)
  try:
    evaluator = evals.get(args.eval)
    trained = trained_lib.load(args.workdir, args.step)
    metrics = evaluator(trained, split=args.split, num_examples=args.num_examples, show=args.show)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(metrics))


if __name__ == "__main__":
  main()
