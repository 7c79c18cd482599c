"""Tokenizers: SentencePiece with PAD/BOS/EOS and the MASK id used by parallel prediction, or a
pretrained language model's own (Hugging Face `tokenizer.json`: GPT-2's byte-level BPE,
Llama's / SmolLM's), behind one class.

A tokenizer carries its special ids (`Tokenizer.special`); losses and decoding take them
from there, never from module constants, so a GPT-2 or Llama vocabulary can stand in.

A Hugging Face tokenizer is stored as one file where a run keeps its tokenizer (the workdir's
`tokenizer.model`, copied into exports alike): a JSON object `{"format": HF_FORMAT, "special":
{pad, bos, eos, mask}, "tokenizer": <tokenizer.json text>}` (`write_hf`); `Tokenizer(path)`
reads either kind. Reading one needs the `tokenizers` package (the `hf` extra).
"""

import dataclasses
import io
import json
import os
import pathlib
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


HF_FORMAT = "capjax-hf-tokenizer-v1"
HF_FILES = ("tokenizer.json", "vocab.json + merges.txt")


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TokenizerError("A Hugging Face tokenizer needs the `tokenizers` package: "
                         "pip install -e '.[hf]'.") from None
  return tokenizers


def hf_tokenizer_json(directory) -> str:
  """The tokenizer of a Hugging Face (or converted) model directory as `tokenizer.json` text:
  that file, else GPT-2's `vocab.json` + `merges.txt` as a byte-level BPE. A directory with
  neither is a `TokenizerError`."""
  directory = pathlib.Path(directory)
  if (directory / "tokenizer.json").exists():
    return (directory / "tokenizer.json").read_text()
  if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
    tk = _tokenizers()
    bpe = tk.Tokenizer(tk.models.BPE.from_file(str(directory / "vocab.json"),
                                               str(directory / "merges.txt")))
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    return bpe.to_str()
  raise TokenizerError(f"{directory} has no tokenizer ({' or '.join(HF_FILES)}); save the "
                       "model's fast tokenizer there with save_pretrained.")


def hf_special_ids(hf_config: dict, source) -> SpecialIds:
  """BOS, EOS and PAD of a language model's `config.json`. BOS and PAD default to EOS (GPT-2
  and SmolLM have one <|endoftext|> for all): the prefix-LM tasks count a caption's tokens
  through its first EOS, never by PAD. No MASK (-1): parallel prediction is CapPa's."""
  first = lambda v: v[0] if isinstance(v, list) and v else v
  eos = first(hf_config.get("eos_token_id"))
  if not isinstance(eos, int):
    raise TokenizerError(f"{source}: config.json has no eos_token_id; the captioner must learn "
                         "to end its captions with the model's EOS.")
  bos, pad = first(hf_config.get("bos_token_id")), first(hf_config.get("pad_token_id"))
  return SpecialIds(pad=eos if pad is None else pad, bos=eos if bos is None else bos, eos=eos,
                    mask=-1)


def hf_tokenizer_file(directory, hf_config: dict) -> bytes:
  """A model directory's tokenizer (`hf_tokenizer_json`) with the special ids of its
  `config.json` (`hf_special_ids`): the bytes of the file a run keeps as its tokenizer."""
  text = hf_tokenizer_json(directory)
  special = hf_special_ids(hf_config, directory)
  stored = {"format": HF_FORMAT, "special": dataclasses.asdict(special), "tokenizer": text}
  _HFBackend(stored, f"{directory}/tokenizer.json")  # a bad one fails here, not mid-run
  return json.dumps(stored).encode()


class _HFBackend:
  """A stored Hugging Face tokenizer (`write_hf`): ids without any special tokens added."""

  def __init__(self, stored: dict, path: str):
    damaged = f"Tokenizer file {path} holds a damaged {HF_FORMAT} tokenizer"
    try:
      self.special = SpecialIds(**stored["special"])
      tokenizer_json = stored["tokenizer"]
    except (KeyError, TypeError):
      raise TokenizerError(f"{damaged} (no special ids or tokenizer).") from None
    tk = _tokenizers()
    try:
      self.tokenizer = tk.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises plain Exception
      raise TokenizerError(f"{damaged} ({str(e).splitlines()[0][:200]}).") from None
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _stored_hf(data: bytes) -> dict | None:
  """The stored Hugging Face tokenizer in `data`, or None (a sentencepiece model)."""
  if not data.lstrip().startswith(b"{"):
    return None
  try:
    stored = json.loads(data)
  except ValueError:
    return None
  return stored if isinstance(stored, dict) and stored.get("format") == HF_FORMAT else None


class Tokenizer:
  """Captions <-> fixed-length id arrays `[BOS w1 .. wn EOS PAD ..]` of length max_len + 1."""

  def __init__(self, path: str):
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"No tokenizer model at {path}; train one with tools/train_tokenizer.py.")
    self.path = path
    proto = epath.Path(path).read_bytes()
    self.sp, self._hf = None, None
    stored = _stored_hf(proto)
    if stored is not None:
      self._hf = _HFBackend(stored, path)
      self.special, self.unk_id = self._hf.special, None
      return
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
    return self._hf.vocab_size if self._hf else self.sp.get_piece_size()

  def encode(self, caption: str, max_len: int) -> np.ndarray:
    """int32[max_len + 1]; captions longer than max_len - 1 tokens are truncated."""
    ids = (self._hf or self.sp).encode(caption)[:max_len - 1]
    tokens = np.full(max_len + 1, self.special.pad, np.int32)
    tokens[:len(ids) + 2] = [self.special.bos, *ids, self.special.eos]
    return tokens

  def decode(self, ids) -> str:
    """Stops at the first EOS (after a leading BOS: GPT-2's BOS is its EOS); ignores
    BOS/PAD/MASK.

    Ids past the vocabulary (a model's `vocab_size` may exceed the tokenizer's,
    and an untrained model emits any id) decode as UNK (sentencepiece) or are dropped.
    """
    out, sp = [], self.special
    for n, i in enumerate(np.asarray(ids).tolist()):
      if n == 0 and i == sp.bos:
        continue
      if i == sp.eos:
        break
      if i not in (sp.pad, sp.bos, sp.mask):
        if 0 <= i < self.vocab_size:
          out.append(i)
        elif self.unk_id is not None:
          out.append(self.unk_id)
    return (self._hf or self.sp).decode(out)
