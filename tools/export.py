"""Export a training run's params (no optimizer state) with its config and tokenizer.

  python tools/export.py --workdir=DIR --output=OUT [--step=N]

The checkpoint is verified first: a damaged newest one gives way to the previous intact one
(with a warning); a damaged --step, or no intact checkpoint, is a one-line error (exit 2).
Load the result with `capjax.trained.load(OUT)` (or `load_exported`); the
caption / evaluate / serve commands accept OUT wherever they take a workdir.
"""

import argparse
import sys

from capjax import checkpoint, trained


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="training workdir (has checkpoints/)")
  parser.add_argument("--output", required=True, help="directory to write; gs:// works")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  args = parser.parse_args(argv)
  try:
    step = trained.export(args.workdir, args.output, args.step)
  except (FileNotFoundError, FileExistsError, checkpoint.CheckpointMismatchError,
          checkpoint.CheckpointDamagedError, checkpoint.NoUsableCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {step} of {args.workdir} to {args.output}", file=sys.stderr)


if __name__ == "__main__":
  main()
