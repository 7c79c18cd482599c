"""metrics.jsonl: one row a logged step, also after a resume, on local disks and object stores;
tools/plot_metrics.py draws it."""

import io
import json
import sys

import pytest

from capjax import metrics_log, train
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


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_log_file_gets_a_plain_line_per_logged_step_and_no_redrawn_bar(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  writer = metrics_log.MetricsWriter(str(tmp_path), tiny_config(), total_steps=100)
  writer.progress(10, {"train/loss": 1.5, "perf/examples_per_s": 90.0, "perf/mfu": 0.05})
  writer.message("step 10: val/loss 1.2000\n  generated: 'a'   true: 'b'")
  writer.progress(20, {"train/loss": 1.25, "perf/examples_per_s": 91.0, "perf/mfu": 0.05})
  writer.close()
  assert capsys.readouterr().err.splitlines() == [
      "train 10/100: loss 1.5, ex/s 90, mfu 0.05",
      "step 10: val/loss 1.2000", "  generated: 'a'   true: 'b'",
      "train 20/100: loss 1.25, ex/s 91, mfu 0.05"]


@pytest.mark.slow
def test_on_a_terminal_an_evaluation_and_its_samples_redraw_the_bar_once(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  terminal = Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  messages = []
  message = metrics_log.MetricsWriter.message
  monkeypatch.setattr(metrics_log.MetricsWriter, "message",
                      lambda self, text: (messages.append(text), message(self, text)))
  train.train(tiny_config(**{"train.num_steps": 10, "eval.every": 10,
                             "eval.num_captions": 3}), str(tmp_path / "run"))
  evaluation = [m for m in messages if "val/loss" in m]
  assert len(evaluation) == 1 and evaluation[0].count("generated:") == 3
  assert not [m for m in messages if "generated:" in m and "val/loss" not in m]
  # On the terminal the block stands whole: the bar is not drawn again between its lines.
  assert evaluation[0] + "\n" in terminal.getvalue()
