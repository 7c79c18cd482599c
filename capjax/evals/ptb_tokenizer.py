"""The COCO caption evaluation's tokenization in Python, for machines without `java`.

`pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer` writes every caption on a line of one text,
runs Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` on it in Java and drops
the tokens in `PUNCTUATIONS` from each output line. `tokenize` does the same with NLTK's
`TreebankWordTokenizer` (Apache-2.0; regular expressions only, no data files), which follows
the Penn Treebank conventions (contractions split, "cannot" -> "can not", "gonna" -> "gon na",
brackets -> -LRB- etc., quotes -> `` and ''), with these changes, each found by running the
Java tokenizer (`tests/test_captioning_metrics.py` compares the two):
- a period ends a word unless the word is an abbreviation in `_ABBREVIATIONS`, "no" before a
  number, or single letters joined by periods ("U.S.", "e.g."; a single letter loses it before
  a capitalized word, also at the start of the next caption);
- runs of "!" and "?" are one token ("!!!", kept by the filter); an opening ' or ` is split
  from its word ("'stop'"), except in "'90s", "'cause", "'em" and the contractions;
- a hyphen or slash at the start or end of a word is split from it ("w/", "-ish");
- `<tag>`s are single tokens; symbols and punctuation outside ASCII are split from words;
- curly quotes, guillemets, dashes, "…", "£", "€", "¢", "¼", "½", "¾" are written as Java
  writes them; characters outside the Basic Multilingual Plane (emoji), control, format and
  private-use characters are dropped; "&amp;", "&lt;", "&gt;" and "&quot;" are decoded.
Known to differ from the Java tokenizer (none in the tests' captions): URLs and e-mail addresses
(Java keeps them whole), "AT&T" (one Java token), ASCII symbols inside words ("a*b", "a+b"),
emoticons (":)" is ":-rrb-" in Java), some apostrophes inside words ("a'b", "y'all", "d'ye",
"rock 'n' roll", 5'10"), "shouldn't've", "a---b", and control characters that Java reads as line
breaks (they shift pycocoevalcap's lines against its captions; here they are spaces).
"""

import re
import unicodedata

import nltk
from nltk.tokenize import treebank

PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                ":", "-", "--", "...", ";")  # pycocoevalcap's; upper-case -LRB- never matches
_DROPPED = frozenset(PUNCTUATIONS)

# Words that keep their period in the Java output, probed one by one.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr mt ft lt col gen sgt capt prof rev gov sen rep inc co corp ltd bros "
    "vs etc cf al jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri ave rd "
    "blvd est dept sq messrs mme mlle ph.d".split())
_CHARS = str.maketrans({
    "‘": " ` ", "’": "'", "“": " `` ", "”": " '' ", "«": " `` ", "»": " '' ", "—": " -- ",
    "–": " -- ", "…": " ... ", "£": " # ", "€": " $ ", "¢": " cents ", "¼": " 1/4 ",
    "½": " 1/2 ", "¾": " 3/4 ", "\xad": ""})
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"'}
_SPACES = [
    (re.compile("|".join(_ENTITIES)), lambda m: _ENTITIES[m.group()]),
    (re.compile(r"[^\x00-\x7f]"), lambda m: (
        " " if ord(m.group()) > 0xFFFF or unicodedata.category(m.group())[0] == "C" else
        f" {m.group()} " if unicodedata.category(m.group())[0] in "SP" else m.group())),
    (re.compile(r"[\x00-\x08\x0e-\x1f\x7f]"), lambda m: " "),
    (re.compile(r"(?<![\w/-])[/-](?=[^\W\d])|(?<=\w)[/-](?![\w/-])"), lambda m: f" {m.group()} "),
]
_TAG = re.compile(r"(<[/\w][^<>\s]*>)")
_QUOTED_WORD = re.compile(
    r"([`']+(?!(?:s|m|d|ll|re|ve|t|n'?|em|cause|\d\ds?)\.*$)|\.+(?=[^\W\d_]))(\w.*)", re.I)
_PERIOD_WORD = re.compile(r"(.*\w)([`']*)(\.+)")
_ACRONYM = re.compile(r"[^\W\d_](\.[^\W\d_])*")


def _treebank() -> treebank.TreebankWordTokenizer:
  """NLTK's tokenizer with '!!!' as one token and without its sentence-final period rule."""
  tokenizer = treebank.TreebankWordTokenizer()
  punctuation = [(p, s) for p, s in tokenizer.PUNCTUATION if not p.pattern.endswith(r"\s*$")]
  bang = [i for i, (p, _) in enumerate(punctuation) if p.pattern == "[?!]"]
  if len(bang) != 1 or len(punctuation) != len(tokenizer.PUNCTUATION) - 1:
    raise RuntimeError(f"capjax's PTB tokenizer does not know NLTK {nltk.__version__}'s rules")
  punctuation[bang[0]] = (re.compile(r"[?!]+"), r" \g<0> ")
  tokenizer.PUNCTUATION = punctuation
  return tokenizer


_TREEBANK = _treebank()


def _words(line: str) -> list[str]:
  """The tokens of one line, cased as written, periods still attached to words."""
  tokens = []
  for i, piece in enumerate(_TAG.split(line.translate(_CHARS))):
    if i % 2:  # a <tag>
      tokens.append(piece)
      continue
    for pattern, replacement in _SPACES:
      piece = pattern.sub(replacement, piece)
    tokens += _TREEBANK.tokenize(piece, convert_parentheses=True)
  split = []
  for token in tokens:
    quoted = _QUOTED_WORD.fullmatch(token)
    split += [quoted.group(1), quoted.group(2)] if quoted else [token]
  return split


def _keeps_period(word: str, next_token: str) -> bool:
  lower = word.lower()
  if lower in _ABBREVIATIONS or (lower == "no" and next_token[:1].isdigit()):
    return True
  return bool(_ACRONYM.fullmatch(word)) and not (len(word) == 1 and next_token[:1].isupper())


def tokenize_lines(lines: list[str]) -> list[str]:
  """Each line's tokens, lower-cased and without `PUNCTUATIONS`, joined by spaces."""
  words = [_words(line) for line in lines]
  following = [token for line in words for token in line][1:] + [""]
  out, k = [], 0
  for line in words:
    kept = []
    for token in line:
      period = _PERIOD_WORD.fullmatch(token)
      if period:
        keep = not period.group(2) and _keeps_period(period.group(1), following[k])
        token = period.group(1) + ("." if keep else "")
      token = token.lower()
      if token not in _DROPPED and token.strip("."):
        kept.append(token)
      k += 1
    out.append(" ".join(kept))
  return out


def tokenize(captions_for_image: dict) -> dict:
  """`PTBTokenizer().tokenize` of pycocoevalcap: {id: [{"caption": str}, ...]} -> {id: [str]}."""
  ids = [k for k, captions in captions_for_image.items() for _ in captions]
  lines = [c["caption"].replace("\n", " ") for captions in captions_for_image.values()
           for c in captions]
  tokenized = {}
  for k, line in zip(ids, tokenize_lines(lines)):
    tokenized.setdefault(k, []).append(line)
  return tokenized
