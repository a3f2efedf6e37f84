import argparse
import pickle

import pytest
import torch

from mae import create_model
from mae.checkpoint import load_checkpoint, model_state, save_checkpoint


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_round_trip_and_official_style_namespace_args(tmp_path):
    model = create_model("mae_vit_tiny_patch4")
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(blr=1.5e-4)}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["args"].blr == 1.5e-4
    fresh = create_model("mae_vit_tiny_patch4")
    fresh.load_state_dict(model_state(ckpt), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary file left


def test_a_failed_save_leaves_neither_the_file_nor_a_temporary(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "fn": lambda: None}, path)  # a lambda does not pickle, halfway through
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"] and path.read_bytes() == before
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 3, "fn": lambda: None}, tmp_path / "fresh.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_loading_refuses_to_run_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)
