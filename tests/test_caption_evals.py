"""The captioning and zero-shot evaluators, and evaluators run during training (`config.evals`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib, evals, evaluate, train, trained as trained_lib
from capjax.data import synthetic
from capjax.evals import zeroshot
from tests import helpers


@evals.register("test_numbers")
def _numbers(trained, *, scale: float = 1.0, name: str = "x"):
  return {"eval": "test_numbers", "value": 2 * scale, "count": 3, "missing": None, "flag": True,
          "name": name, "step": trained.step}


def test_config_evals_are_checked_at_load():
  config = helpers.tiny_config(**{"evals.zeroshot.every": 5, "evals.zeroshot.label_sets":
                                  "('colour',)", "evals.attributes.every": 10})
  assert config.evals.zeroshot.to_dict() == {"every": 5, "label_sets": ("colour",)}
  assert config.evals.attributes.every == 10
  for override, message in [
      ("evals.nope.every", r"evals\.nope: Unknown --eval='nope'; expected one of .*'zeroshot'"),
      ("evals.zeroshot.bogus", r"evals\.zeroshot\.bogus: --eval=zeroshot has no option 'bogus'"),
      ("evals.zeroshot.every", r"evals\.zeroshot\.every=-1 is out of range")]:
    with pytest.raises(config_lib.ConfigError, match=message):
      helpers.tiny_config(**{override: -1})


def test_preset_evals_entries_are_checked_at_load():
  config = config_lib.load_preset("shapes_tiny")
  config.evals.zeroshot = {"every": 100, "num_examples": "many"}
  with pytest.raises(config_lib.ConfigError, match=r"evals\.zeroshot\.num_examples='many'"):
    config_lib.validate(config)
  config.evals.zeroshot = {"num_examples": 8}
  with pytest.raises(config_lib.ConfigError, match=r"evals\.zeroshot must be a dict with `every`"):
    config_lib.validate(config)


def test_due_evals_run_every_n_steps_and_at_the_end():
  config = helpers.tiny_config(**{"train.num_steps": 25, "evals.attributes.every": 10,
                                  "evals.zeroshot.every": 0})
  assert [s for s in range(1, 26) if evals.due(config, s)] == [10, 20, 25]
  assert evals.due(config, 20) == ["attributes"]


def test_configured_evals_log_their_numbers_only():
  config = helpers.tiny_config()
  with config.unlocked():
    config.evals.test_numbers = {"every": 1, "scale": 3.0}
  trained = trained_lib.Trained(config, None, None, None, 7)
  assert evals.run_configured("test_numbers", trained) == {
      "eval/test_numbers/value": 6.0, "eval/test_numbers/count": 3}


def test_shapes_prompts_are_the_captions_own_language():
  assert zeroshot.shapes_templates()[0] == "a {size} {colour} {shape}"
  assert zeroshot.shapes_count_openings() == {
      "one": ("a picture of one", "a single"), "two": ("two shapes a",),
      "three": ("there are three shapes a", "three shapes a")}
  prompts = zeroshot.class_prompts("shape", ("circle", "cross"), ["a {size} {colour} {shape}"],
                                   {"size": ("small", "large"), "colour": ("red",),
                                    "shape": ("circle", "cross")})
  assert prompts == [["a small red circle", "a large red circle"],
                     ["a small red cross", "a large red cross"]]
  with pytest.raises(ValueError, match=r"names \{mood\}, not a label set"):
    zeroshot.class_prompts("shape", ("circle",), ["a {mood} {shape}"], {"shape": ("circle",)})


def test_top_k_accuracy_caps_k_at_the_class_count():
  scores = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
  labels = np.array([2, 1, 0])
  assert zeroshot.top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
  assert zeroshot.top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
  assert zeroshot.top_k_accuracy(scores, labels, 5) == 1.0


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny CapPa trained 80 steps on shapes (all autoregressive), with an in-training eval."""
  workdir = tmp_path_factory.mktemp("cappa")
  config = helpers.tiny_config(**{
      "train.num_steps": 80, "checkpoint.every": 80, "objective.masked_pred_prob": 0.0,
      "eval.every": 0, "schedule.warmup_steps": 10, "evals.zeroshot.every": 40,
      "evals.zeroshot.num_examples": 64, "evals.zeroshot.label_sets": "('colour',)"})
  train.train(config, str(workdir))
  return str(workdir)


@pytest.mark.slow
def test_training_logs_configured_evals(trained_workdir):
  rows = [json.loads(line) for line in open(f"{trained_workdir}/metrics.jsonl")]
  evaluated = [r for r in rows if "eval/zeroshot/colour/top1" in r]
  assert [r["step"] for r in evaluated] == [40, 80]
  assert "eval/zeroshot/eval" not in evaluated[0] and "eval/zeroshot/step" not in evaluated[0]
  assert evaluated[0]["eval/zeroshot/colour/chance_top1"] == pytest.approx(1 / 6)


def _untrained(trained):
  return trained_lib.Trained(trained.config, trained.task, helpers.random_head(
      jax.tree.map(jnp.zeros_like, trained.params)), trained.tokenizer, 0)


@pytest.mark.slow
def test_zeroshot_of_a_trained_model_beats_an_untrained_one(trained_workdir, capsys):
  evaluate.main([f"--workdir={trained_workdir}", "--eval=zeroshot", "--num_examples=96",
                 "--label_sets=('colour','size','count')"])
  out = capsys.readouterr()
  metrics = json.loads(out.out.strip().splitlines()[-1])
  assert metrics["eval"] == "zeroshot" and metrics["step"] == 80 and metrics["num_images"] == 96
  assert "colour: top-1" in out.err and "(chance 0.167)" in out.err
  trained = trained_lib.load(trained_workdir)
  baseline = zeroshot.zeroshot_accuracy(_untrained(trained), num_examples=96,
                                        label_sets=("colour", "size", "count"))
  assert metrics["colour/top1"] > baseline["colour/top1"] + 0.2, (metrics, baseline)
  assert metrics["colour/top1"] > 2 * metrics["colour/chance_top1"]
  assert metrics["size/top5"] == 1.0  # two classes: top-5 is top-2


@pytest.mark.slow
def test_caption_log_likelihoods_are_the_score_of_each_pair(trained_workdir):
  trained = trained_lib.load(trained_workdir)
  source = synthetic.make_source(trained.config.data, "test")
  images = np.stack([source[0]["image"], source[1]["image"]])
  captions = ["a small red circle", "a large blue square"]
  scores = zeroshot.caption_log_likelihoods(trained, images, captions)
  assert scores.shape == (2, 2) and scores.dtype == np.float32
  tokens = np.stack([trained.tokenizer.encode(c, trained.config.model.max_len) for c in captions])
  direct = trained.predict_fns()["score_captions"](trained.params, images[[1, 1]], tokens)
  np.testing.assert_allclose(scores[1], np.asarray(direct), rtol=1e-6)
  prefix = zeroshot.caption_log_likelihoods(trained, images, captions, prefix=True)
  assert np.all(prefix > scores)  # the EOS term is left out


@pytest.mark.slow
def test_captioning_eval_command_on_a_trained_model(trained_workdir, capsys, monkeypatch,
                                                    tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # no java: no METEOR start-up in the test
  evaluate.main([f"--workdir={trained_workdir}", "--eval=captioning", "--num_examples=24",
                 "--show=2"])
  out = capsys.readouterr()
  metrics = json.loads(out.out.strip().splitlines()[-1])
  assert metrics["eval"] == "captioning" and metrics["num_images"] == 24
  assert metrics["METEOR"] is None and out.err.count("generated:") == 2
  trained = trained_lib.load(trained_workdir)
  untrained = evals.run("captioning", _untrained(trained), num_examples=24, show=0)
  assert metrics["CIDEr"] > untrained["CIDEr"] + 0.2 and metrics["Bleu_1"] > untrained["Bleu_1"]
