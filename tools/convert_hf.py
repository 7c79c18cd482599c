"""Convert a local Hugging Face model directory into capjax params.

  python tools/convert_hf.py --src=HF_DIR --dst=DIR

HF_DIR holds `config.json` and `*.safetensors` (what `save_pretrained` writes or a hub
download leaves; sharded checkpoints too). DIR gets `params.safetensors` (the module's float32
params, keys joined by "/"), `capjax_model.json` (family and module config) and the source's
other .json / .txt / .model files (tokenizer, image processor). Load either directory with
`capjax.models.hf.load(DIR)`. An unsupported architecture or a missing tensor is a one-line
error (exit 2).
"""

import argparse
import sys

import numpy as np


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="Hugging Face model directory")
  parser.add_argument("--dst", required=True, help="directory to write")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top  # after --help
  from capjax.models import hf  # pylint: disable=g-import-not-at-top
  try:
    family, config = hf.save_converted(args.src, args.dst)
    module, params = hf.load(args.dst)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"converted {args.src} -> {args.dst}: {family} ({type(module).__name__}), "
        f"{count:,} params, config {config}", file=sys.stderr)


if __name__ == "__main__":
  main()
