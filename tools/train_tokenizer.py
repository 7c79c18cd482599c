"""Train a SentencePiece tokenizer on the training captions of a configured dataset.

The captions are cleaned as the pipeline cleans them (`data.lowercase`,
`data.strip_punctuation`); `--vocab_size` is an upper bound (a small corpus gets
fewer pieces).

  python tools/train_tokenizer.py --config=flickr_small --output=tok.model \
      [--model_type=word|char|unigram|bpe] [--vocab_size=N] [--config.data.dir=...]
"""

import argparse
import sys

from capjax import config as config_lib
from capjax.data import pipeline, tokenizer


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--model_type", default=None, choices=tokenizer.MODEL_TYPES)
  parser.add_argument("--vocab_size", type=int, default=None)
  args, overrides = parser.parse_known_args(argv)
  try:
    config = config_lib.load(args.config, overrides)
    tok = tokenizer.train(
        pipeline.training_captions(config), args.output,
        args.vocab_size or config.tokenizer.vocab_size,
        args.model_type or config.tokenizer.model_type)
  except (config_lib.ConfigError, pipeline.DataNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.output}: {tok.vocab_size} pieces, special ids {tok.special}")


if __name__ == "__main__":
  main(sys.argv[1:])
