"""Write single-object `shapes` scenes as an image folder (`data.name=imagefolder`).

  python tools/shapes_folder.py --output=runs/shapes_folder [--label=shape|colour|size]
      [--train_per_class=100] [--test_per_class=50] [--image_size=64]

Writes OUTPUT/train/<class>/*.png and OUTPUT/test/<class>/*.png, the class being the object's
shape (or colour, or size): a stand-in for a user's own labelled folders.
"""

import argparse
import sys

from capjax.data import synthetic


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--label", default="shape", choices=("shape", "colour", "size"))
  parser.add_argument("--train_per_class", type=int, default=100)
  parser.add_argument("--test_per_class", type=int, default=50)
  parser.add_argument("--image_size", type=int, default=64)
  args = parser.parse_args(argv)
  for split, n in (("train", args.train_per_class), ("test", args.test_per_class)):
    written = synthetic.write_class_folders(args.output, split, n, args.image_size, args.label)
    print(f"{args.output}/{split}: {written}")


if __name__ == "__main__":
  main(sys.argv[1:])
