"""Checkpoint files: a failed save never corrupts the previous one; loading never runs code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from pixelmill.errors import ModelError
from pixelmill.training.checkpoint import AtomicCheckpointIO, read_checkpoint


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "boom": _Explodes()}, path)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.reliability("untrusted: malicious pickle as a checkpoint refused, payload not run")
def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ModelError, match="refusing to load"):
        read_checkpoint(bad)
    assert not marker.exists()
