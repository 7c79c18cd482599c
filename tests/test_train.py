"""`python -m capjax.train` end to end on a tiny shapes model: metrics, config errors."""

import subprocess

import pytest

from tests import train_cli


@pytest.fixture(scope="module", params=[0.0, 1.0], ids=["captioning_only", "parallel_only"])
def finished_run(request, tmp_path_factory):
  """40 steps with masked_pred_prob 0 (all autoregressive) or 1 (all parallel prediction)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  out = train_cli.run(workdir, **{"train.num_steps": 40, "eval.every": 20,
                                  "objective.masked_pred_prob": request.param})
  assert out.returncode == 0, out.stderr[-3000:]
  return request.param, workdir, out


def test_train_loss_falls_and_parallel_fraction_follows_the_config(finished_run):
  prob, workdir, _ = finished_run
  rows = [r for r in train_cli.metrics(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [10, 20, 30, 40]
  assert rows[-1]["train/loss"] < 0.85 * rows[0]["train/loss"], rows
  assert all(r["train/parallel_fraction"] == prob for r in rows)
  assert all(r["train/skipped_steps"] == 0 for r in rows)


def test_val_loss_is_reported_at_eval_steps(finished_run):
  _, workdir, out = finished_run
  val = [r for r in train_cli.metrics(workdir) if "val/loss" in r]
  assert [r["step"] for r in val] == [20, 40]
  assert val[-1]["val/loss"] < val[0]["val/loss"]
  assert "step 40: val/loss" in out.stderr


def test_unknown_config_key_is_a_one_line_error(tmp_path):
  out = subprocess.run(train_cli.command(tmp_path / "run") + ["--config.foo=1"],
                       cwd=train_cli.ROOT, env=train_cli.env(), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "'foo'" in lines[0], out.stderr
  assert not (tmp_path / "run").exists()
