"""`python -m capjax.caption --workdir=DIR IMAGE_OR_DIR... [--decode=greedy|beam|sample|parallel]`

Prints one JSON line per image on stdout, in the order given: {"image": path, "caption": str},
plus "captions" and "scores" (best first; see `capjax.decode`) when --num_captions > 1. An
image that cannot be read gets {"image": path, "error": why} and the others are still
captioned. A folder stands for its image files (by extension, sorted, not recursive), with a
progress bar on stderr. --attention_maps=OUT writes OUT/<image name>/ PNGs (see
`capjax.evals.attention_maps`). Exit 2 with one line for a bad workdir or option.
"""

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from capjax import captioner as captioner_lib, checkpoint
from capjax.data import tokenizer as tokenizer_lib
from capjax.evals import attention_maps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LOAD_ERRORS = (ValueError, OSError, checkpoint.CheckpointDamagedError,
               checkpoint.NoUsableCheckpointError, tokenizer_lib.TokenizerError)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
  parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
  parser.add_argument("--workdir", required=True, help="a training workdir or an export")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--decode", default="greedy", choices=captioner_lib.DECODES)
  parser.add_argument("--num_captions", type=int, default=1)
  parser.add_argument("--beam_size", type=int, default=None,
                      help=f"1-{captioner_lib.MAX_BEAM} (default max(4, num_captions))")
  parser.add_argument("--length_penalty", type=float, default=None, help="beam: GNMT alpha, 0.6")
  parser.add_argument("--temperature", type=float, default=None, help="sample: 1.0")
  parser.add_argument("--top_k", type=int, default=None, help="sample: 0 (off)")
  parser.add_argument("--top_p", type=float, default=None, help="sample: 1.0 (off)")
  parser.add_argument("--seed", type=int, default=None, help="sample: 0")
  parser.add_argument("--max_len", type=int, default=None, help="new tokens (model.max_len)")
  parser.add_argument("--min_len", type=int, default=None, help="new tokens before EOS (0)")
  parser.add_argument("--refine_steps", type=int, default=None, help="parallel: 0")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--resize", default=None, choices=captioner_lib.RESIZES,
                      help="default: as the model was trained (data.resize)")
  parser.add_argument("--attention_maps", default=None, metavar="OUTDIR")
  return parser.parse_args(argv)


def expand(inputs: list[str]) -> tuple[list[str], bool]:
  """(image paths, whether a folder was given)."""
  paths, folders = [], False
  for item in inputs:
    if os.path.isdir(item):
      folders = True
      paths += sorted(os.path.join(item, name) for name in os.listdir(item)
                      if name.lower().endswith(IMAGE_EXTENSIONS)
                      and os.path.isfile(os.path.join(item, name)))
    else:
      paths.append(item)
  return paths, folders


def map_directory(root: str, path: str, used: set) -> str:
  """OUT/<file name without extension>, numbered where two images share a name."""
  stem = os.path.splitext(os.path.basename(path))[0] or "image"
  name, n = stem, 1
  while name in used:
    n += 1
    name = f"{stem}_{n}"
  used.add(name)
  return os.path.join(root, name)


def caption_batch(captioner, paths, args, options, map_names: set) -> list[dict]:
  """The JSON lines of `paths`, in order."""
  lines, good, images = [], [], []
  for path in paths:
    try:
      images.append(captioner.preprocess_one(path, args.resize))
      good.append(len(lines))
      lines.append({"image": path})
    except captioner_lib.ImageError as e:
      lines.append({"image": path, "error": str(e)})
  if not images:
    return lines
  images = np.stack(images)
  out = captioner.generate(images, args.decode, args.num_captions, **options)
  for i, tokens_NxL, scores_N in zip(good, out.tokens, out.scores):
    texts = [captioner.to_text(t) for t in tokens_NxL]
    lines[i]["caption"] = texts[0]
    if args.num_captions > 1:
      lines[i].update(captions=texts, scores=[round(float(s), 4) for s in scores_N])
  if args.attention_maps:
    write_maps(captioner, images, out.tokens[:, 0], [lines[i]["image"] for i in good],
               args.attention_maps, map_names)
  return lines


def write_maps(captioner, images, tokens_BxL, paths, root: str, used: set):
  cross, encoder = captioner.attention(images, tokens_BxL)
  for image, tokens_L, cross_LxT, encoder_HxTxT, path in zip(images, tokens_BxL, cross,
                                                              encoder, paths):
    attention_maps.write(map_directory(root, path, used), image, captioner.pieces(tokens_L),
                         cross_LxT, encoder_HxTxT, captioner.config.model.num_registers)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  options = {k: getattr(args, k) for k in captioner_lib.OPTIONS if getattr(args, k) is not None}
  try:
    if args.batch_size < 1:
      raise ValueError(f"--batch_size={args.batch_size}; expected >= 1.")
    captioner = captioner_lib.Captioner.load(args.workdir, args.step, args.batch_size)
    captioner.check_options(args.decode, args.num_captions, options)
  except LOAD_ERRORS as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  paths, folders = expand(args.images)
  map_names = set()
  with tqdm(total=len(paths), disable=not folders, file=sys.stderr, unit="image") as bar:
    for start in range(0, len(paths), args.batch_size):
      batch = paths[start:start + args.batch_size]
      for line in caption_batch(captioner, batch, args, options, map_names):
        print(json.dumps(line), flush=True)
      bar.update(len(batch))


if __name__ == "__main__":
  main()
