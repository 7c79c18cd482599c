"""capjax.captioner and `python -m capjax.caption`: preprocessing as training does it,
batching, options, scores, the CLI's JSON lines and attention maps. Fast tests use an
untrained tiny CapPa (random vocabulary head); the slow one trains a tiny model."""

import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from capjax import caption, captioner as captioner_lib, train, trained as trained_lib
from capjax.data import pipeline, synthetic, tokenizer as tokenizer_lib
from tests import helpers


def tiny_captioner(tmp_path_factory, batch_size=4):
  config = helpers.tiny_config()
  source = synthetic.make_source(config.data, "train")
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  tok = tokenizer_lib.train([c for i in range(300) for c in source[i]["captions"]], path,
                            config.tokenizer.vocab_size, config.tokenizer.model_type)
  task = helpers.task(config)
  params = jax.jit(lambda: helpers.random_head(nn.meta.unbox(task.init_params(
      jax.random.key(0)))))()
  return captioner_lib.Captioner(trained_lib.Trained(config, task, params, tok, 0), batch_size)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
  return tiny_captioner(tmp_path_factory)


@pytest.fixture(scope="module")
def scenes(captioner):
  """Five test-split shapes images (uint8, the model's size) and their records."""
  source = synthetic.make_source(captioner.config.data, "test")
  return [source[i] for i in range(5)]


def image_folder(directory, scenes) -> list[str]:
  """PNG and JPEG files of the scenes (at 3x size, so resizing matters), a corrupt JPEG and
  a text file; returns the image paths in sorted order."""
  os.makedirs(directory, exist_ok=True)
  for i, scene in enumerate(scenes):
    big = Image.fromarray(scene["image"]).resize((96, 80))  # not square either
    big.save(os.path.join(directory, f"scene{i}.{'png' if i % 2 else 'jpg'}"), quality=95)
  with open(os.path.join(directory, "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
  with open(os.path.join(directory, "notes.txt"), "w") as f:
    f.write("not an image")
  return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                if not n.endswith(".txt"))


def test_preprocess_is_the_training_pipelines_evaluation_preprocessing(captioner, scenes,
                                                                       tmp_path):
  config = captioner.config
  preprocess = pipeline.Preprocess.from_config(config)
  record = {"image": np.asarray(Image.fromarray(scenes[0]["image"]).resize((96, 80))),
            "captions": ["a red circle"]}
  expected = pipeline.make_example(record, captioner.tokenizer, preprocess, None)["image"]
  path = str(tmp_path / "scene.png")
  Image.fromarray(record["image"]).save(path)
  for image in (record["image"], path, Image.open(path)):
    got = captioner.preprocess([image])
    assert got.shape == (1, config.data.image_size, config.data.image_size, 3)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], expected)
  letterboxed = captioner.preprocess([record["image"]], resize="letterbox")[0]
  assert not np.array_equal(letterboxed, expected) and letterboxed[0].max() == 0  # bars


def test_preprocess_converts_grey_and_transparent_images_and_names_bad_ones(captioner,
                                                                           tmp_path):
  grey = np.full((40, 40), 200, np.uint8)
  np.testing.assert_array_equal(captioner.preprocess([grey])[0], 200)
  clear = np.zeros((40, 40, 4), np.uint8)  # fully transparent: composited on white
  np.testing.assert_array_equal(captioner.preprocess([clear])[0], 255)
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(captioner_lib.ImageError, match="bad.png"):
    captioner.preprocess([str(bad)])
  with pytest.raises(captioner_lib.ImageError, match="uint8"):
    captioner.preprocess([np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(captioner_lib.ImageError, match="missing file"):
    captioner.preprocess([str(tmp_path / "nowhere.jpg")])


def test_captions_do_not_depend_on_how_images_are_batched(captioner, scenes):
  images = np.stack([s["image"] for s in scenes])  # 5 images: batches of 4 and a padded 1
  batched = captioner.generate(images)
  one_batch = captioner_lib.Captioner(captioner.trained, batch_size=8).generate(images)
  assert batched.tokens.shape == (5, 1, captioner.config.model.max_len)
  np.testing.assert_array_equal(batched.tokens, one_batch.tokens)
  texts = captioner.captions(images, "beam", num_captions=3, beam_size=3)
  assert [len(t) for t in texts] == [3] * 5 and all(isinstance(c, str) for t in texts for c in t)
  out = captioner.generate(images, "beam", num_captions=3, beam_size=3)
  assert np.all(np.diff(out.scores, axis=1) <= 0)
  assert captioner.captions(images[:2], "sample", 2, seed=3) == captioner.captions(
      images[:2], "sample", 2, seed=3)


def test_score_encodes_each_image_once_for_many_captions(captioner, scenes):
  images = np.stack([s["image"] for s in scenes])
  captions = [["a small red circle", "two shapes a large blue square left of a small cross",
               "a green triangle", "there is a small white cross"]] * 5
  scores = captioner.score(images, captions)
  assert scores.shape == (5, 4) and np.all(scores < 0)
  task, params = captioner.trained.task, captioner.params
  for i in range(4):
    tokens = np.stack([captioner.tokenize(row[i]) for row in captions])
    np.testing.assert_allclose(scores[:, i], task.score_captions(params, images, tokens),
                               rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="same number of captions"):
    captioner.score(images[:2], [["a"], ["a", "b"]])


@pytest.mark.parametrize("decode,n,options,match", [
    ("greedy", 2, {}, "num_captions=2 needs decode=beam"),
    ("beam", 1, {"beam_size": 11}, "beam_size=11"),
    ("beam", 5, {"beam_size": 3}, "exceeds beam_size"),
    ("sample", 1, {"top_p": 0.0}, "top_p"),
    ("sample", 1, {"temperature": 0}, "temperature"),
    ("greedy", 1, {"max_len": 1000}, "max_len=1000"),
    ("greedy", 1, {"beams": 3}, "unknown decoding option"),
    ("nucleus", 1, {}, "decode='nucleus'"),
])
def test_bad_options_are_one_line_errors(captioner, decode, n, options, match):
  with pytest.raises(ValueError, match=match):
    captioner.check_options(decode, n, options)


def test_parallel_decoding_needs_a_model_trained_for_it(captioner):
  trained = captioner.trained
  config = helpers.tiny_config(**{"objective.masked_pred_prob": 0.0})
  autoregressive = captioner_lib.Captioner(trained_lib.Trained(
      config, trained.task, trained.params, trained.tokenizer, 0))
  with pytest.raises(ValueError, match="masked_pred_prob"):
    autoregressive.check_options("parallel", 1, {})


def run_cli(args, capsys) -> tuple[list[dict], str]:
  caption.main(args)
  out = capsys.readouterr()
  return [json.loads(line) for line in out.out.splitlines()], out.err


def test_cli_captions_files_and_folders_and_reports_unreadable_images(
    captioner, scenes, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(captioner_lib.Captioner, "load", lambda *a, **k: captioner)
  paths = image_folder(tmp_path / "images", scenes)
  lines, err = run_cli(["--workdir=unused", str(tmp_path / "images"), paths[1],
                        str(tmp_path / "nowhere.png"), "--batch_size=3"], capsys)
  assert [line["image"] for line in lines] == paths + [paths[1], str(tmp_path / "nowhere.png")]
  broken = lines[paths.index(str(tmp_path / "images" / "broken.jpg"))]
  assert set(broken) == {"image", "error"}
  assert broken["error"] in [f"{broken['image']}: {why}" for why in ("not an image",
                                                                     "corrupt image")]
  assert "missing file" in lines[-1]["error"]
  good = [line for line in lines if "error" not in line]
  assert len(good) == 6 and all(set(line) == {"image", "caption"} for line in good)
  readable = [p for p in paths if not p.endswith("broken.jpg")]  # paths[1] is the first
  expected = captioner.captions(captioner.preprocess(readable))
  assert [line["caption"] for line in good[:5]] == [c[0] for c in expected]
  assert good[5]["caption"] == good[readable.index(paths[1])]["caption"]
  assert "image" in err  # the progress bar, for a folder

  lines, _ = run_cli(["--workdir=unused", readable[0], "--decode=beam", "--num_captions=2"],
                     capsys)
  assert len(lines[0]["captions"]) == 2 and len(lines[0]["scores"]) == 2
  assert lines[0]["caption"] == lines[0]["captions"][0]


def test_cli_attention_maps_are_pngs_per_word_and_for_the_registers(
    captioner, scenes, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(captioner_lib.Captioner, "load", lambda *a, **k: captioner)
  paths = image_folder(tmp_path / "images", scenes[:2])
  lines, _ = run_cli(["--workdir=unused", *paths, f"--attention_maps={tmp_path / 'maps'}"],
                     capsys)
  for line in lines:
    if "error" in line:
      continue
    folder = tmp_path / "maps" / os.path.splitext(os.path.basename(line["image"]))[0]
    names = sorted(os.listdir(folder))
    tokens = captioner.generate(captioner.preprocess([line["image"]])).tokens[0, 0]
    words = len(captioner.pieces(tokens))
    assert "registers.png" in names
    assert len([n for n in names if n[:2].isdigit()]) == words
    assert ("words.png" in names) == (words > 0)
    for name in names:
      with Image.open(folder / name) as png:
        assert png.format == "PNG" and png.width > 100


def test_cli_bad_workdir_is_one_line_and_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    caption.main([f"--workdir={tmp_path / 'nothing'}", "x.png"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err


@pytest.mark.slow
def test_caption_command_on_a_trained_model(tmp_path, tmp_path_factory):
  """`python -m capjax.caption` end to end: a workdir trained here, PNG and JPEG files and a
  folder with a corrupt file, greedy, beam, sampling and attention maps."""
  workdir = str(tmp_path / "run")
  config = helpers.tiny_config(**{"train.num_steps": 30, "checkpoint.every": 30,
                                  "eval.every": 0, "objective.masked_pred_prob": 0.5})
  train.train(config, workdir)
  source = synthetic.make_source(config.data, "test")
  paths = image_folder(tmp_path / "images", [source[i] for i in range(3)])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
  for extra in ([], ["--decode=beam", "--num_captions=2"], ["--decode=sample", "--seed=1"],
                ["--decode=parallel", "--refine_steps=2"],
                [f"--attention_maps={tmp_path / 'maps'}"]):
    done = subprocess.run([sys.executable, "-m", "capjax.caption", f"--workdir={workdir}",
                           str(tmp_path / "images"), *extra], capture_output=True, text=True,
                          env=env, check=True)
    lines = [json.loads(line) for line in io.StringIO(done.stdout)]
    assert [line["image"] for line in lines] == paths
    assert sum("error" in line for line in lines) == 1
    assert all(isinstance(line.get("caption", ""), str) for line in lines)
  assert any(name.endswith(".png") for _, _, names in os.walk(tmp_path / "maps")
             for name in names)
  bad = subprocess.run([sys.executable, "-m", "capjax.caption", f"--workdir={tmp_path}/none",
                        paths[0]], capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
