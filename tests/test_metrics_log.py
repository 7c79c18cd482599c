"""metrics.jsonl: one row a logged step, also after a resume, on local disks and object stores;
tools/plot_metrics.py draws it."""

import json

import pytest

from capjax import metrics_log
from tests.helpers import tiny_config
from tools import plot_metrics


@pytest.mark.parametrize("local", [True, False], ids=["append", "object_store_rewrite"])
def test_a_resumed_writer_drops_rows_past_its_step_and_writes_after_them(
    tmp_path, monkeypatch, local):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  monkeypatch.setattr(metrics_log, "is_local", lambda path: local)
  config = tiny_config()
  writer = metrics_log.MetricsWriter(str(tmp_path), config, total_steps=10)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": float(step)})
  writer.close()  # a crash after step 3, in the middle of writing step 4's row ...
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/lo')
  # ... with the last checkpoint at step 2.

  writer = metrics_log.MetricsWriter(str(tmp_path), config, total_steps=10, initial_step=2)
  writer.write(3, {"train/loss": 30.0})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_plot_metrics_draws_the_loss_curves_to_a_png(tmp_path, capsys):
  rows = [{"step": s, "train/loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "val/loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  plot_metrics.main([str(tmp_path)])
  assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
  assert capsys.readouterr().out.strip() == str(tmp_path / "loss.png")
  series = plot_metrics.read_series(tmp_path / "metrics.jsonl")
  assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4, 5] and series["val/loss"] == [(5, 1.0)]
  with pytest.raises(SystemExit, match="no .*metrics.jsonl; train first"):
    plot_metrics.main([str(tmp_path / "empty")])
