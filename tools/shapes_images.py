"""Writes built-in `shapes` images as image files, to caption or look at.

  python tools/shapes_images.py --output=DIR [--num=6] [--split=test] [--image_size=64]

Images alternate PNG and JPEG (quality 95): shape_0000.png, shape_0001.jpg, ...; their
first true caption goes to DIR/captions.txt ("file<TAB>caption" a line).
"""

import argparse
import os

from PIL import Image

from capjax.data import synthetic


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--num", type=int, default=6)
  parser.add_argument("--split", default="test", choices=sorted(synthetic.SPLIT_IDS))
  parser.add_argument("--image_size", type=int, default=64)
  args = parser.parse_args(argv)
  os.makedirs(args.output, exist_ok=True)
  source = synthetic.ShapesSource(args.split, max(args.num, 1), args.image_size)
  lines = []
  for i in range(args.num):
    record = source[i]
    name = f"shape_{i:04d}.{'png' if i % 2 == 0 else 'jpg'}"
    Image.fromarray(record["image"]).save(os.path.join(args.output, name), quality=95)
    lines.append(f"{name}\t{record['captions'][0]}\n")
  with open(os.path.join(args.output, "captions.txt"), "w") as f:
    f.writelines(lines)
  print(f"wrote {args.num} images to {args.output}")


if __name__ == "__main__":
  main()
