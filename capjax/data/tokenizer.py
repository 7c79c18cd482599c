"""SentencePiece tokenizer with PAD/BOS/EOS and the MASK id used by parallel prediction.

A tokenizer carries its special ids (`Tokenizer.special`); losses and decoding take them
from there, never from module constants, so a GPT-2 or Llama vocabulary can stand in.
"""

import dataclasses
import io
import os
import re
from typing import Iterable

from etils import epath
import numpy as np
import sentencepiece as spm

from capjax.config import ConfigError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # what `train` asks sentencepiece for
MASK_PIECE = "<mask>"
MODEL_TYPES = ("word", "char", "unigram", "bpe")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  bos: int
  eos: int
  mask: int


# The ids a tokenizer made by `train` has (<mask> is the first user-defined piece, after unk):
# what abstract runs (tools/plan_pod.py, bench/) use, where no tokenizer exists.
SENTENCEPIECE_IDS = SpecialIds(pad=PAD_ID, bos=BOS_ID, eos=EOS_ID, mask=UNK_ID + 1)


def train(captions: Iterable[str], path: str, vocab_size: int, model_type: str = "unigram"):
  """Trains a model on `captions` and writes it to `path`. Returns a `Tokenizer`.

  `vocab_size` is an upper bound: a corpus with fewer distinct pieces gets a
  smaller vocabulary (sentencepiece's `hard_vocab_limit=False`). A bound below
  what the corpus needs (one piece per distinct character plus the special
  ones) or an empty corpus is a `config.ConfigError` saying so.
  """
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"Unknown tokenizer.model_type={model_type!r}; expected one of "
                      f"{MODEL_TYPES}.")
  captions = [c for c in captions if c.strip()]
  if not captions:
    raise ConfigError("No captions to train the tokenizer on (the training split is empty).")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        user_defined_symbols=[MASK_PIECE], hard_vocab_limit=False, character_coverage=1.0,
        minloglevel=2)
  except RuntimeError as e:
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
    if needed is None:
      raise
    raise ConfigError(
        f"tokenizer.vocab_size={vocab_size} is too small for the {len(captions)} training "
        f"captions: a {model_type} model needs at least {needed.group(1)} pieces (one per "
        "distinct character plus the special ones).") from None
  path = epath.Path(path)  # a local path or gs://
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written whole, then renamed: a crash mid-write never leaves a half tokenizer behind.
  partial = path.parent / f"{path.name}.partial-{os.getpid()}"
  partial.write_bytes(model.getvalue())
  partial.rename(path)
  return Tokenizer(str(path))


class TokenizerError(ValueError):
  """A tokenizer file that is missing, empty or not a sentencepiece model (one line)."""


class Tokenizer:
  """Captions <-> fixed-length id arrays `[BOS w1 .. wn EOS PAD ..]` of length max_len + 1."""

  def __init__(self, path: str):
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"No tokenizer model at {path}; train one with tools/train_tokenizer.py.")
    self.path = path
    proto = epath.Path(path).read_bytes()
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=proto) if proto else None
    except RuntimeError:
      self.sp = None
    if self.sp is None:
      reason = "the file is empty" if not proto else f"{len(proto)} bytes that do not parse"
      raise TokenizerError(
          f"Tokenizer file {path} is not a sentencepiece model ({reason}); delete it to train a "
          "new one, or point tokenizer.path at a good one.")
    self.special = SpecialIds(pad=self.sp.pad_id(), bos=self.sp.bos_id(), eos=self.sp.eos_id(),
                              mask=self.sp.piece_to_id(MASK_PIECE))
    self.unk_id = self.sp.unk_id()

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, caption: str, max_len: int) -> np.ndarray:
    """int32[max_len + 1]; captions longer than max_len - 1 tokens are truncated."""
    ids = self.sp.encode(caption)[:max_len - 1]
    tokens = np.full(max_len + 1, self.special.pad, np.int32)
    tokens[:len(ids) + 2] = [self.special.bos, *ids, self.special.eos]
    return tokens

  def decode(self, ids) -> str:
    """Stops at the first EOS; ignores BOS/PAD/MASK.

    Ids past the vocabulary (a model's `vocab_size` may exceed the tokenizer's,
    and an untrained model emits any id) decode as UNK.
    """
    out, sp = [], self.special
    for i in np.asarray(ids).tolist():
      if i == sp.eos:
        break
      if i not in (sp.pad, sp.bos, sp.mask):
        out.append(i if 0 <= i < self.vocab_size else self.unk_id)
    return self.sp.decode(out)
