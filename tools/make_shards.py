"""Convert image-caption pairs into ArrayRecord shards for `data.name=shards`.

  python tools/make_shards.py --input=PAIRS --output=DIR [--num_shards=N] \
      [--split=train] [--format=array_record|tfds] [--no_verify]

PAIRS is a .csv (header image,caption), a .jsonl ({"image", "caption"}
lines), a webdataset .tar (KEY.jpg + KEY.txt), or a folder of them; see
capjax/data/shards.py. Bad inputs are skipped; their counts are printed at the
end (stdout), progress goes to stderr.
"""

import argparse
import json
import sys

import tqdm

from capjax.data import images
from capjax.data import shards


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--split", default="train")
  parser.add_argument("--format", default="array_record",
                      choices=shards.FORMATS)
  parser.add_argument("--no_verify", action="store_true",
                      help="do not decode each image while converting")
  parser.add_argument("--max_image_pixels", type=int,
                      default=images.DEFAULT_MAX_PIXELS)
  args = parser.parse_args(argv)

  skips = images.SkipCounter()
  verify = not args.no_verify
  try:
    shards.input_files(args.input)  # Fails early, before any progress bar.
    if args.format == "array_record":
      examples = shards.iter_examples(args.input, skips, verify,
                                      args.max_image_pixels)
      progress = tqdm.tqdm(examples, desc="examples", unit="", file=sys.stderr)
      count = shards.write_array_record(progress, args.output, args.num_shards,
                                        args.split)
    else:  # TFDS shows its own progress bars.
      count = shards.write_tfds(args.input, args.output, args.num_shards,
                                args.split, skips, verify,
                                args.max_image_pixels)
  except (images.DataNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  skipped = skips.as_dict()
  print(f"wrote {count} examples ({args.format}, split {args.split}) to "
        f"{args.output}; skipped {sum(skipped.values())}: {json.dumps(skipped)}")


if __name__ == "__main__":
  main(sys.argv[1:])
