"""Attribute accuracy of each decoding method on a checkpoint trained on `shapes`.

  python bench/decode_quality.py --workdir=runs/demo [--num_examples=256] [--batch_size=128]

Captions the first --num_examples test images with greedy, beam search, sampling and
parallel decoding (with 0-8 refinement rounds) through `capjax.captioner.Captioner` and
prints each method's attribute accuracy and share of fully right captions
(`capjax.data.synthetic.score_caption`, as `--eval=attributes` scores greedy captions). The
last line is machine-readable: RESULT <method>=<attribute accuracy> ...
"""

import argparse
import sys
import time

import numpy as np

from capjax import captioner as captioner_lib
from capjax.data import pipeline, synthetic

METHODS = [
    ("greedy", "greedy", {}),
    ("beam4", "beam", {"beam_size": 4}),
    ("beam4_alpha0", "beam", {"beam_size": 4, "length_penalty": 0.0}),
    ("beam1_alpha0", "beam", {"beam_size": 1, "length_penalty": 0.0}),
    ("sample_t1", "sample", {"temperature": 1.0, "seed": 0}),
    ("sample_t0.7_p0.9", "sample", {"temperature": 0.7, "top_p": 0.9, "seed": 0}),
    ("parallel", "parallel", {}),
    ("parallel_refine1", "parallel", {"refine_steps": 1}),
    ("parallel_refine2", "parallel", {"refine_steps": 2}),
    ("parallel_refine4", "parallel", {"refine_steps": 4}),
    ("parallel_refine8", "parallel", {"refine_steps": 8}),
]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_examples", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=128)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  captioner = captioner_lib.Captioner.load(args.workdir, batch_size=args.batch_size)
  if captioner.config.data.name != "shapes":
    sys.exit("error: bench/decode_quality.py needs a model trained on data.name=shapes.")
  images, attributes = [], []
  for batch in pipeline.eval_batches(captioner.config, captioner.tokenizer, "test",
                                     args.num_examples, args.batch_size):
    images.append(batch["image"])
    attributes += [r["attributes"] for r in batch["records"]]
  images = np.concatenate(images)
  parallel_ok = captioner.config.objective.masked_pred_prob > 0
  print(f"{args.workdir} (step {captioner.trained.step}), {len(images)} test images")
  print(f"{'method':<18} {'attributes':>10} {'fully right':>12} {'seconds':>8}")
  results = {}
  for name, decode, options in METHODS:
    if decode == "parallel" and not parallel_ok:
      continue
    start = time.perf_counter()
    captions = [c[0] for c in captioner.captions(images, decode, **options)]
    seconds = time.perf_counter() - start  # compilation included
    exact = [synthetic.score_caption(c, a) for c, a in zip(captions, attributes)]
    results[name] = synthetic.attribute_accuracy(captions, attributes)
    fully = float(np.mean([c == t for c, t in exact]))
    print(f"{name:<18} {results[name]:>10.3f} {fully:>12.3f} {seconds:>8.1f}")
  print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))


if __name__ == "__main__":
  main()
