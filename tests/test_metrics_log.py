"""metrics.jsonl: one row a logged step, also after a resume, on local disks and object stores."""

import json

import pytest

from capjax import metrics_log
from tests.helpers import tiny_config


@pytest.mark.parametrize("local", [True, False], ids=["append", "object_store_rewrite"])
def test_a_resumed_writer_drops_rows_past_its_step_and_writes_after_them(
    tmp_path, monkeypatch, local):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  monkeypatch.setattr(metrics_log, "is_local", lambda path: local)
  config = tiny_config()
  writer = metrics_log.MetricsWriter(str(tmp_path), config, total_steps=10)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": float(step)})
  writer.close()  # a crash after step 3, with the last checkpoint at step 2

  writer = metrics_log.MetricsWriter(str(tmp_path), config, total_steps=10, initial_step=2)
  writer.write(3, {"train/loss": 30.0})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()
