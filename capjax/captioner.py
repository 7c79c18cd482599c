"""One captioner: a trained model, the preprocessing it was trained with, and its decoders.

What `python -m capjax.caption`, the evaluators and train.py's in-loop samples caption with:

  captioner = Captioner.load("runs/demo")                  # a workdir or an export
  images = captioner.preprocess(["a.jpg", pil_image, array_HxWx3])
  captioner.captions(images, decode="beam", num_captions=3, beam_size=5)
  captioner.score(images, [["a red circle", "a blue square"]] * len(images))

Images are batched `batch_size` at a time (a short last batch is padded, so a batch size
compiles once). Decoding options (`captions`, `generate`; each decoder reads its own):
  max_len (max new tokens, default model.max_len), min_len (0: EOS allowed at once);
  beam: beam_size (default max(4, num_captions), 1-10), length_penalty (0.6, GNMT's alpha);
  sample: temperature (1.0), top_k (0: off), top_p (1.0: off), seed (0; the same seed and
    batches give the same samples);
  parallel: refine_steps (0); only for models trained with objective.masked_pred_prob > 0.
"""

import functools
import os

import jax
import numpy as np
from PIL import Image

from capjax import decode, trained as trained_lib
from capjax.data import images as images_lib, transforms
from capjax.evals import attention_maps

DECODES = ("greedy", "beam", "sample", "parallel")
RESIZES = ("center_crop", "letterbox")
OPTIONS = {"max_len": None, "min_len": 0, "beam_size": None, "length_penalty": 0.6,
           "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "refine_steps": 0}
MAX_BEAM = 10
SCORE_ROWS = 1024  # image-caption pairs a decoder pass scores at most


class ImageError(ValueError):
  """An image that cannot be used; the message names it and says why."""


@functools.partial(jax.jit, static_argnames=("task", "decoder"))
def _encode(task, decoder, params, images_uint8):
  return decoder.encode(params, task.pixels(images_uint8))


def _pad_rows(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
  """x with its last row (along `axis`) repeated up to n rows."""
  missing = n - x.shape[axis]
  if missing <= 0:
    return x
  return np.concatenate([x, np.repeat(np.take(x, [-1], axis=axis), missing, axis=axis)], axis)


class Captioner:

  def __init__(self, trained: trained_lib.Trained, batch_size: int = 64):
    self.decoder = trained.task.decoder()  # the family's (`Task.decoder`)
    if self.decoder is None:
      raise ValueError(f"task {trained.config.task!r} does not caption: it has no decoder.")
    self.trained, self.model, self.batch_size = trained, trained.task.model, batch_size
    self.config, self.tokenizer = trained.config, trained.tokenizer
    self.special = trained.tokenizer.special
    self.dtype = trained.task.dtype

  @classmethod
  def load(cls, path: str, step: int | None = None, batch_size: int = 64) -> "Captioner":
    """The newest (or given) checkpoint of a workdir, or an export (`capjax.trained.load`)."""
    return cls(trained_lib.load(path, step), batch_size)

  @property
  def params(self):
    return self.trained.params

  @property
  def image_size(self) -> int:
    return self.config.data.image_size

  # ------------------------------------------------------------------ images

  def default_resize(self) -> str:
    """How training resized images for evaluation: data.resize, a random crop's being a
    center crop (`data.transforms.to_square`)."""
    resize = self.config.data.get("resize", "center_crop")
    return resize if resize in RESIZES else "center_crop"

  def load_image(self, image) -> np.ndarray:
    """uint8[H, W, 3] from a path, a PIL image or an array (uint8 HxW, HxWx1, HxWx3 or
    HxWx4), decoded by the training data's rules (EXIF orientation, RGB, alpha on white);
    an unusable image is an `ImageError`."""
    if isinstance(image, (str, os.PathLike)):
      decoded = images_lib.load_image(os.fspath(image), self.config.data.max_image_pixels)
      name = os.fspath(image)
    elif isinstance(image, Image.Image):
      decoded, name = images_lib.from_pil(image), "PIL image"
    elif isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ImageError(f"image array has dtype {image.dtype}; expected uint8 [0, 255].")
      if image.ndim == 3 and image.shape[-1] == 3:
        return image
      if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
      if image.ndim not in (2, 3) or image.ndim == 3 and image.shape[-1] != 4:
        raise ImageError(f"image array of shape {image.shape}; expected HxW, HxWx1, HxWx3 or "
                         "HxWx4.")
      decoded, name = images_lib.from_pil(Image.fromarray(image)), "image array"
    else:
      raise ImageError(f"cannot read an image from a {type(image).__name__}; expected a path, "
                       "a PIL image or a uint8 array.")
    if decoded.reason is not None:
      raise ImageError(f"{name}: {decoded.reason.replace('_', ' ')}")
    return decoded.image

  def preprocess_one(self, image, resize: str | None = None) -> np.ndarray:
    resize = resize or self.default_resize()
    if resize not in RESIZES:
      raise ValueError(f"resize={resize!r}; expected one of {RESIZES}.")
    return transforms.to_square(self.load_image(image), self.image_size, resize)

  def preprocess(self, images, resize: str | None = None) -> np.ndarray:
    """uint8[B, S, S, 3] as training preprocesses for evaluation: the square of data.image_size
    by `resize` (default: as the model was trained, `default_resize`)."""
    return np.stack([self.preprocess_one(image, resize) for image in images])

  # ------------------------------------------------------------------ decoding

  def check_options(self, decode_name: str, num_captions: int, options: dict) -> dict:
    """The options with their defaults; a ValueError (one line) names a bad one."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
      raise ValueError(f"unknown decoding option(s) {unknown}; expected some of "
                       f"{sorted(OPTIONS)}.")
    o = {**OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    max_len = self.config.model.max_len
    o["max_len"] = o["max_len"] or max_len
    o["beam_size"] = o["beam_size"] or max(4, num_captions)
    checks = [
        (decode_name in DECODES, f"decode={decode_name!r}; expected one of {DECODES}"),
        (num_captions >= 1, f"num_captions={num_captions}; expected >= 1"),
        (num_captions == 1 or decode_name in ("beam", "sample"),
         f"num_captions={num_captions} needs decode=beam or decode=sample"),
        (1 <= o["max_len"] <= max_len, f"max_len={o['max_len']}; expected 1-{max_len} "
         "(model.max_len)"),
        (0 <= o["min_len"] <= o["max_len"], f"min_len={o['min_len']}; expected 0-max_len"),
        (1 <= o["beam_size"] <= MAX_BEAM, f"beam_size={o['beam_size']}; expected 1-{MAX_BEAM}"),
        (decode_name != "beam" or num_captions <= o["beam_size"],
         f"num_captions={num_captions} exceeds beam_size={o['beam_size']}"),
        (o["length_penalty"] >= 0, f"length_penalty={o['length_penalty']}; expected >= 0"),
        (o["temperature"] > 0, f"temperature={o['temperature']}; expected > 0"),
        (o["top_k"] >= 0, f"top_k={o['top_k']}; expected >= 0 (0: off)"),
        (0 < o["top_p"] <= 1, f"top_p={o['top_p']}; expected in (0, 1] (1: off)"),
        (o["refine_steps"] >= 0, f"refine_steps={o['refine_steps']}; expected >= 0"),
        (decode_name != "parallel" or (self.decoder.parallel
                                        and self.config.objective.masked_pred_prob > 0),
         "decode=parallel needs a model trained with parallel prediction "
         "(objective.masked_pred_prob > 0)"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message + ".")
    return o

  def _decode_batch(self, images_uint8, decode_name: str, n: int, o: dict, key):
    images = self.trained.task.pixels(images_uint8)
    common = {"special": self.special, "max_new_tokens": o["max_len"]}
    autoregressive = {**common, "min_new_tokens": o["min_len"]}
    if decode_name == "greedy":
      return decode.greedy(self.decoder, self.params, images, **autoregressive)
    if decode_name == "beam":
      return decode.beam_search(self.decoder, self.params, images, beam_size=o["beam_size"],
                                num_return=n, length_penalty_alpha=o["length_penalty"],
                                **autoregressive)
    if decode_name == "sample":
      return decode.sample(self.decoder, self.params, images, key, num_samples=n,
                           temperature=o["temperature"], top_k=int(o["top_k"]),
                           top_p=o["top_p"], **autoregressive)
    return decode.parallel(self.model, self.params, images, length=self.config.model.max_len,
                           refine_steps=o["refine_steps"], **common)

  def generate(self, images_uint8, decode: str = "greedy", num_captions: int = 1,
               **options) -> decode.Decoded:
    """Tokens int32[B, num_captions, L] (EOS, then PAD), best first, and their scores, as
    numpy (see `capjax.decode`)."""
    o = self.check_options(decode, num_captions, options)
    images_uint8 = np.asarray(images_uint8)
    if not len(images_uint8):
      raise ValueError("no images to caption.")
    step = min(self.batch_size, len(images_uint8))
    parts = []
    for start in range(0, len(images_uint8), step):
      chunk = images_uint8[start:start + step]
      key = jax.random.fold_in(jax.random.key(o["seed"]), start // step)
      out = self._decode_batch(_pad_rows(chunk, step), decode, num_captions, o, key)
      parts.append(jax.tree.map(lambda x, n=len(chunk): np.asarray(x)[:n], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def to_text(self, tokens_L) -> str:
    return self.tokenizer.decode(tokens_L)

  def pieces(self, tokens_L) -> list[str]:
    """The tokens before the first EOS as the tokenizer's pieces (words, for a word
    tokenizer), without sentencepiece's word-start mark; ids past the vocabulary are UNK."""
    sp, out = self.tokenizer.sp, []
    for t in np.asarray(tokens_L).tolist():
      if t == self.special.eos:
        break
      piece = sp.id_to_piece(t if 0 <= t < sp.get_piece_size() else sp.unk_id())
      out.append(piece.replace("\u2581", "") or "\u2581")
    return out

  def captions(self, images_uint8, decode: str = "greedy", num_captions: int = 1,
               **options) -> list[list[str]]:
    """num_captions captions an image, best first."""
    out = self.generate(images_uint8, decode, num_captions, **options)
    return [[self.to_text(t) for t in row] for row in out.tokens]

  # ------------------------------------------------------------------ scoring

  def tokenize(self, caption: str) -> np.ndarray:
    """int32[max_len + 1] `[BOS .. EOS PAD ..]`, cleaned as the training captions were."""
    data = self.config.data
    text = transforms.clean_caption(caption, bool(data.get("lowercase", False)),
                                    bool(data.get("strip_punctuation", False)))
    return self.tokenizer.encode(text, self.config.model.max_len)

  def score(self, images_uint8, captions: list[list[str]]) -> np.ndarray:
    """float32[B, n]: each caption's summed token log-likelihood given its image (EOS
    included, not length-normalised). Each image is encoded once for all its n captions."""
    images_uint8 = np.asarray(images_uint8)
    if not len(images_uint8) or len(captions) != len(images_uint8) or len(
        {len(c) for c in captions}) > 1 or not captions[0]:
      raise ValueError(f"score needs the same number of captions for each of the "
                       f"{len(images_uint8)} images.")
    n = len(captions[0])
    tokens_BxNxL1 = np.asarray([[self.tokenize(c) for c in row] for row in captions])
    step = min(self.batch_size, len(images_uint8))
    per_pass = max(1, min(n, SCORE_ROWS // step))
    scores = np.zeros((len(images_uint8), n), np.float32)
    for start in range(0, len(images_uint8), step):
      rows = min(step, len(images_uint8) - start)
      enc = _encode(self.trained.task, self.decoder, self.params,
                    _pad_rows(images_uint8[start:start + step], step))
      for first in range(0, n, per_pass):
        tokens = _pad_rows(tokens_BxNxL1[start:start + rows, first:first + per_pass], per_pass,
                           axis=1)
        out = self.decoder.log_likelihood(self.params, enc, _pad_rows(tokens, step),
                                          self.special)
        scores[start:start + rows, first:first + per_pass] = np.asarray(out)[
            :rows, :min(per_pass, n - first)]
    return scores

  # ------------------------------------------------------------------ attention

  def attention(self, images_uint8, tokens_BxL) -> tuple[np.ndarray, np.ndarray]:
    """(cross float32[B, L, T]: the cross-attention of the decoder's last layer at the step
    that generated each token, mean over heads; encoder float32[B, heads, T, T]: the
    encoder's last layer), T = registers + patches (`capjax.evals.attention_maps`)."""
    if not isinstance(self.decoder, decode.EncoderDecoder):
      raise ValueError(f"task {self.config.task!r} has no cross-attention to draw maps of.")
    cross, encoder = attention_maps.weights(self.model, self.params, np.asarray(images_uint8),
                                            np.asarray(tokens_BxL, np.int32), dtype=self.dtype,
                                            bos=self.special.bos)
    return np.asarray(cross[-1]).mean(axis=1), np.asarray(encoder)
