"""The evaluator registry: options come from the evaluator's signature, typed by its defaults."""

import pytest

from capjax import evals, evaluate


@evals.register("test_options")
def _evaluator(trained, *, split="test", num_examples=8, shots=(1, 5), plot=None, strict=False):
  return {"trained": trained, "split": split, "num_examples": num_examples, "shots": shots,
          "plot": plot, "strict": strict}


def test_options_are_the_evaluators_keyword_defaults():
  assert evals.options("test_options") == {
      "split": "test", "num_examples": 8, "shots": (1, 5), "plot": None, "strict": False}
  assert "num_examples" in evals.options("attributes")


def test_parse_options_types_values_like_their_defaults():
  parsed = evals.parse_options("test_options", [
      "--num_examples=32", "--shots=[1,10]", "--plot=out.png", "--strict=true", "--split=val"])
  assert parsed == {"num_examples": 32, "shots": (1, 10), "plot": "out.png", "strict": True,
                    "split": "val"}


@pytest.mark.parametrize("arg, message", [
    ("--nope=1", "has no option --nope"), ("--num_examples=many", "Expected int"),
    ("stray", "Unrecognized argument")])
def test_parse_options_rejects_in_one_line(arg, message):
  with pytest.raises(ValueError, match=message):
    evals.parse_options("test_options", [arg])


def test_run_passes_options_and_rejects_unknown_ones():
  assert evals.run("test_options", "model", num_examples=3)["num_examples"] == 3
  with pytest.raises(ValueError, match="has no option 'shot'"):
    evals.run("test_options", "model", shot=3)
  with pytest.raises(ValueError, match="Unknown --eval='nope'"):
    evals.get("nope")


def test_cli_splits_data_overrides_from_options():
  data, options = evaluate.split_args(["--data.name=imagefolder", "--shots=[1]", "--data.dir=D"])
  assert data == ["--config.data.name=imagefolder", "--config.data.dir=D"]
  assert options == ["--shots=[1]"]


def test_cli_help_lists_the_evaluators_options(capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--eval=test_options", "--help"])
  assert exit_info.value.code == 0
  assert "--shots=(1, 5)" in capsys.readouterr().err


def test_distinct_captions_share_counts_the_first_64_images():
  from capjax.evals import attributes  # pylint: disable=g-import-not-at-top
  assert attributes.distinct_share(["a", "b", "a", "c"]) == 0.75
  assert attributes.distinct_share(["a"] * 64 + [str(i) for i in range(100)]) == 1 / 64
  assert attributes.distinct_share([]) == 0.0
