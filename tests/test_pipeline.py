"""The grain input pipeline on a tiny Flickr8k folder: preprocessing options, skip
counts, per-process slices, exact resume (threads and worker processes), and
`python -m capjax.train --config=flickr_small` end to end.

Every image is 16x16 with its id in the red channel of pixel (0, 0); at
data.image_size=16 center crop and letterbox leave it as it is, so a batch says
which items it holds.
"""

import csv
import json
import os
import subprocess
import sys

import grain
import numpy as np
from PIL import Image
import pytest

from capjax import config as config_lib
from capjax.data import flickr8k, pipeline, tokenizer as tokenizer_lib, transforms
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_VAL, NUM_TEST = 24, 4, 4
SIZE = 16
# Faster XLA:CPU compiles for the train.py runs (as in tests/test_multihost.py).
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"


def image_of(item_id: int) -> np.ndarray:
  rng = np.random.default_rng(item_id)
  image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  image[0, 0, 0] = item_id
  return image


def captions_of(item_id: int) -> list[str]:
  return [f"A Dog, Number {item_id}!", f"the DOG number {item_id} runs."]


def ids_of(batch) -> list[int]:
  return batch["image"][:, 0, 0, 0].astype(int).tolist()


NAMES = [f"{i:04d}_x.jpg" for i in range(NUM_TRAIN + NUM_VAL + NUM_TEST)]


def split_names(layout: str) -> dict[str, list[str]]:
  """The original layout gets split files; the Kaggle one its seeded split rule."""
  if layout == "kaggle":
    return {s: flickr8k.kaggle_split_names(NAMES, s) for s in ("train", "val", "test")}
  return {"train": NAMES[:NUM_TRAIN], "val": NAMES[NUM_TRAIN:NUM_TRAIN + NUM_VAL],
          "test": NAMES[NUM_TRAIN + NUM_VAL:]}


def make_flickr(root, layout: str = "original", bad=()):
  """Writes the folder; `bad` ids get a corrupt image file."""
  image_dir = root / ("Flicker8k_Dataset" if layout == "original" else "Images")
  image_dir.mkdir(parents=True)
  for i, name in enumerate(NAMES):
    if i in bad:
      (image_dir / name).write_bytes(b"\xff\xd8 truncated")
    else:
      Image.fromarray(image_of(i)).save(image_dir / name, format="PNG")
  if layout == "kaggle":
    with open(root / "captions.txt", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["image", "caption"])
      writer.writerows([n, c] for i, n in enumerate(NAMES) for c in captions_of(i))
    return
  lines = [f"{n}#{k}\t{c}" for i, n in enumerate(NAMES) for k, c in enumerate(captions_of(i))]
  (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
  for split, names in split_names(layout).items():
    (root / flickr8k.SPLIT_FILES[split]).write_text("\n".join(names) + "\n")


def flickr_config(data_dir, **overrides):
  args = {"data.dir": str(data_dir), "data.image_size": SIZE, "train.batch_size": 8,
          "model.max_len": 12, "data.num_threads": 1, "data.prefetch": 2, **overrides}
  return config_lib.load("flickr_small", [f"--config.{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
  """(data dir, word tokenizer path) of a clean folder in the original layout."""
  root = tmp_path_factory.mktemp("flickr")
  make_flickr(root)
  tok = str(root / "tok.model")
  tokenizer_lib.train(pipeline.training_captions(flickr_config(root)), tok, 64, "word")
  return root, tok


def take(iterator, n: int) -> list[dict]:
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["tokens"], w["tokens"])


# --------------------------------------------------------- preprocessing ----


def test_shapes_path_keeps_images_as_they_are():
  config = tiny_config()
  size = config.data.image_size
  image = np.zeros((size, size, 3), np.uint8)
  for mode in ("center_crop", "letterbox"):
    assert transforms.to_square(image, size, mode) is image  # no copy, no resampling
  assert pipeline.Preprocess.from_config(config).resize == "center_crop"


def test_resize_modes():
  wide = np.full((20, 40, 3), 200, np.uint8)
  boxed = transforms.to_square(wide, 10, "letterbox")
  assert boxed.shape == (10, 10, 3) and boxed[0].max() == 0 and boxed[5].min() == 200
  strip = np.zeros((1, 100_000, 3), np.uint8)  # bounded work for any aspect ratio
  assert transforms.to_square(strip, 16).shape == (16, 16, 3)
  crops = {transforms.to_square(image_of(5), 8, "random_resized_crop",
                                np.random.default_rng(seed)).tobytes() for seed in range(4)}
  assert len(crops) > 1
  assert transforms.to_square(image_of(5), 8, "random_resized_crop").tobytes() == \
      transforms.to_square(image_of(5), 8).tobytes()  # no rng (evaluation): center crop


@pytest.mark.parametrize("options,cleaned", [
    ({}, "a dog, number 3!"),
    ({"data.strip_punctuation": True}, "a dog number 3"),
    ({"data.lowercase": False}, "A Dog, Number 3!"),
])
def test_captions_are_cleaned_before_tokenization(flickr, options, cleaned):
  root, tok = flickr
  config = flickr_config(root, **options)
  tokenizer = tokenizer_lib.Tokenizer(tok)
  assert pipeline.Preprocess.from_config(config).clean(captions_of(3))[0] == cleaned
  batch = next(pipeline.eval_batches(config, tokenizer, "train", 4, 4))
  assert ids_of(batch) == [0, 1, 2, 3]
  np.testing.assert_array_equal(batch["tokens"][3], tokenizer.encode(cleaned, 12))
  assert batch["records"][3]["captions"] == captions_of(3)  # references stay raw
  # Training: one of the item's captions, cleaned the same way.
  batch = take(iter(pipeline.train_dataset(config, tok)), 1)[0]
  for item_id, tokens in zip(ids_of(batch), batch["tokens"]):
    choices = pipeline.Preprocess.from_config(config).clean(captions_of(item_id))
    assert any(np.array_equal(tokens, tokenizer.encode(c, 12)) for c in choices)


def test_random_resized_crop_only_in_training(flickr):
  root, tok = flickr
  config = flickr_config(root, **{"data.resize": "random_resized_crop"})
  batch = take(iter(pipeline.train_dataset(config, tok)), 1)[0]
  originals = np.stack([image_of(i) for i in ids_of(batch)])
  assert batch["image"].shape == originals.shape
  assert not np.array_equal(batch["image"], originals)
  evaluated = next(pipeline.eval_batches(config, tokenizer_lib.Tokenizer(tok), "val", 4, 4))
  np.testing.assert_array_equal(
      evaluated["image"], np.stack([image_of(NUM_TRAIN + i) for i in range(4)]))


def test_bad_resize_mode_is_a_config_error(flickr):
  root, tok = flickr
  with pytest.raises(config_lib.ConfigError, match="data.resize='squash'"):
    pipeline.train_dataset(flickr_config(root, **{"data.resize": "squash"}), tok)


# --------------------------------------------------------- skip counting ----


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_items_are_counted_not_lost(tmp_path, num_workers):
  root = tmp_path / "flickr"
  make_flickr(root, "original", bad=(2, 7))
  # Item 11 has only punctuation as captions; item 5's image file is missing.
  token_file = root / "Flickr8k.token.txt"
  lines = token_file.read_text().splitlines()
  token_file.write_text("\n".join(
      line.split("\t")[0] + "\t..." if line.startswith(NAMES[11]) else line
      for line in lines) + "\n")
  os.remove(root / "Flicker8k_Dataset" / NAMES[5])
  tok = str(tmp_path / "tok.model")
  config = flickr_config(root, **{"data.strip_punctuation": True,
                                  "data.num_workers": num_workers})
  tokenizer_lib.train(pipeline.training_captions(config), tok, 64, "word")
  dataset = pipeline.train_dataset(config, tok)
  it = iter(dataset)
  batches = take(it, 4)  # 32 examples: more than the 20 good items of an epoch
  getattr(it, "close", lambda: None)()
  good = set(range(NUM_TRAIN)) - {2, 5, 7, 11}
  seen = [i for b in batches for i in ids_of(b)]
  assert set(seen) <= good
  if not num_workers:  # one reader: the first epoch is every good item once
    assert sorted(seen[:len(good)]) == sorted(good)
  metrics = pipeline.skip_metrics(dataset)
  assert metrics["data/skipped_missing_file"] == 1  # index time: counted once
  image_reasons = metrics.get("data/skipped_corrupt_image", 0) + metrics.get(
      "data/skipped_not_an_image", 0)
  assert image_reasons >= 2  # read time: once per read, in whichever process read it
  assert metrics["data/skipped_no_caption_after_cleaning"] >= 1
  assert metrics["data/skipped"] == sum(v for k, v in metrics.items() if k != "data/skipped")


# ------------------------------------------------------ processes, resume ----


def epoch_ids(data_dir: str, tok: str, process_index: int, process_count: int = 2) -> list[int]:
  """The ids of one epoch of this process's slice (24 items / 2 = 3 batches of 4)."""
  config = flickr_config(data_dir)
  it = iter(pipeline.train_dataset(config, tok, process_index, process_count))
  per_process = NUM_TRAIN // process_count
  batches = take(it, per_process // (config.train.batch_size // process_count))
  return [i for b in batches for i in ids_of(b)]


def test_processes_split_an_epoch_without_overlap_or_loss(flickr):
  root, tok = flickr
  in_one_process = [epoch_ids(str(root), tok, i) for i in range(2)]
  assert sorted(in_one_process[0] + in_one_process[1]) == list(range(NUM_TRAIN))
  # Two real processes, as two hosts would run it.
  script = ("import json, sys; from tests.test_pipeline import epoch_ids; "
            "print(json.dumps(epoch_ids(sys.argv[1], sys.argv[2], int(sys.argv[3]))))")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(root), tok, str(i)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (_, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-2000:]
  real = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
  assert real == in_one_process


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_continues_exactly(flickr, tmp_path, num_workers):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root, tok = flickr
  config = flickr_config(root, **{"data.num_workers": num_workers})
  it = iter(pipeline.train_dataset(config, tok))
  take(it, 5)  # past the first epoch (3 batches)
  state = it.get_state()
  manager = ocp.CheckpointManager(tmp_path / "ckpt",
                                  item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  want = take(it, 4)
  by_state = iter(pipeline.train_dataset(config, tok))
  by_state.set_state(state)
  assert_same_batches(take(by_state, 4), want)
  by_checkpoint = iter(pipeline.train_dataset(config, tok))
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(by_checkpoint)))
  assert_same_batches(take(by_checkpoint, 4), want)
  for iterator in (it, by_state, by_checkpoint):
    getattr(iterator, "close", lambda: None)()
  manager.close()


# ---------------------------------------------------------------- train.py ----


def run_train(workdir, *overrides) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
         "XLA_FLAGS": FAST_COMPILE}
  return subprocess.run(
      [sys.executable, "-m", "capjax.train", "--config=flickr_small", f"--workdir={workdir}",
       *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


TINY_MODEL = {"model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2,
              "model.enc_depth": 1, "model.dec_depth": 1, "model.num_registers": 2,
              "model.max_len": 12, "data.image_size": SIZE, "train.batch_size": 8,
              "train.num_steps": 3, "train.log_every": 1, "eval.every": 3,
              "eval.num_examples": 4, "eval.batch_size": 4, "eval.num_captions": 1,
              "checkpoint.every": 0, "dtype": "float32", "data.num_threads": 1}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["kaggle", "original"])
def test_train_cli_on_a_flickr8k_folder(tmp_path, layout):
  root = tmp_path / "flickr"
  make_flickr(root, layout, bad=(NAMES.index(split_names(layout)["train"][0]),))
  overrides = {**TINY_MODEL, "data.dir": str(root)}
  result = run_train(tmp_path / "run", *(f"--config.{k}={v}" for k, v in overrides.items()))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in train_rows)
  assert any("val/loss" in r for r in rows)
  assert train_rows[-1]["data/skipped"] >= 1  # the corrupt train image is counted and logged
  # The tokenizer was trained on the tiny corpus with a vocabulary that fits it.
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "run" / "tokenizer.model"))
  assert tok.vocab_size < 4096


def test_train_cli_without_data_is_one_error_line(tmp_path):
  result = run_train(tmp_path / "run")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Flickr8k: data.dir='' is not a folder")
  assert "--config.data.dir" in last and "captions.txt" in last


def test_tokenizer_fits_a_tiny_corpus(tmp_path):
  captions = [f"a dog number {i} runs" for i in range(10)]
  tok = tokenizer_lib.train(captions, str(tmp_path / "t.model"), 4096, "unigram")
  assert tok.vocab_size < 4096  # shrunk to what the corpus supports
  # A model with a larger vocab_size (untrained) may emit ids the tokenizer lacks.
  assert "⁇" in tok.decode([tokenizer_lib.BOS_ID, 4000, tokenizer_lib.EOS_ID])
  with pytest.raises(config_lib.ConfigError, match="vocab_size=8 is too small.*at least"):
    tokenizer_lib.train(captions, str(tmp_path / "t.model"), 8, "unigram")
  with pytest.raises(config_lib.ConfigError, match="No captions"):
    tokenizer_lib.train(["", "  "], str(tmp_path / "t.model"), 64)
