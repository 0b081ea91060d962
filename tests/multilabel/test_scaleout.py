"""Multi-label runs on the shared machinery: Optuna search on val/map, and two-process DDP equal to one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import multilabel_overrides
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.tuning import tune


def test_tune_maximises_val_map(multidigits: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n")
    args = multilabel_overrides(multidigits, tmp_path / "runs", "trainer.limit_train_batches=3", "eval.splits=[]", epochs=1)
    result = tune(space, 2, args, study_name="ml")
    assert [t["state"] for t in result.trials] == ["complete", "complete"]
    maps = []
    for trial in range(2):
        summary = json.loads((tmp_path / "runs" / "ml" / f"trial-{trial}" / "summary.json").read_text())
        maps.append(summary["best"]["metrics"]["val/map"])
        assert (tmp_path / "runs" / "ml" / f"trial-{trial}" / "thresholds.json").is_file()
    assert result.best["value"] == pytest.approx(max(maps))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(multidigits: Path, tmp_path: Path) -> None:
    """2 ranks x 16 images == 1 process x 32 (see tests/scaleout/test_ddp.py for why a GroupNorm net and 1e-4)."""
    common = ["optim.name=sgd", "optim.lr=0.01", "model.name=small_cnn_gn", "model.drop_rate=0.0", "data.eval_batch_size=32",
              "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "eval.splits=[]", "trainer.accelerator=cpu"]
    single = multilabel_overrides(multidigits, tmp_path / "runs", *common, "run_name=single", "data.batch_size=32", epochs=1)
    ddp = multilabel_overrides(multidigits, tmp_path / "runs", *common, "experiment=ddp", "data.batch_size=16",
                               "trainer.devices=2", "trainer.strategy=ddp", epochs=1)
    for args in (single, ddp):
        out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs" / "ddp").iterdir())  # one run directory for both ranks
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and "val/map" in summary["last_epoch_metrics"]
    one = json.loads((tmp_path / "runs" / "default" / "single" / "summary.json").read_text())["last_epoch_metrics"]
    assert one["val/loss"] == pytest.approx(summary["last_epoch_metrics"]["val/loss"], abs=1e-4)
    w1 = net_state_dict(read_checkpoint(tmp_path / "runs" / "default" / "single" / "checkpoints" / "last.ckpt"))
    w2 = net_state_dict(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
    assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) < 1e-4
    assert (run_dir / "thresholds.json").is_file()
