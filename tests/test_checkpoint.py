import argparse
import pickle

import pytest
import torch

from mae import create_model
from mae.checkpoint import checkpoint_dir_name, load_checkpoint, model_state, save_checkpoint


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


def test_latest_checkpoint_of_a_local_run_directory_by_epoch_and_step(tmp_path):
    from pipelines.common.checkpoints import locate_checkpoint, read_checkpoint
    run = tmp_path / "run"
    for epoch, step in ((2, 88), (9999, 999999999), (10000, 1000000000)):  # the last outgrows the padding
        (run / checkpoint_dir_name(epoch, step)).mkdir(parents=True)
        save_checkpoint({"epoch": epoch}, run / checkpoint_dir_name(epoch, step) / "checkpoint.pth")
    (run / checkpoint_dir_name(10001, 1000000088)).mkdir()  # an upload under way: no file yet, passed over
    (run / "best").mkdir()
    store, name = locate_checkpoint(str(run))
    assert name == f"{checkpoint_dir_name(10000, 1000000000)}/checkpoint.pth" and store.root == str(run)
    assert read_checkpoint(str(run))["epoch"] == 10000
    file = run / checkpoint_dir_name(2, 88) / "checkpoint.pth"
    store, name = locate_checkpoint(str(file))  # a file is itself
    assert (store.root, name) == (str(file.parent), "checkpoint.pth") and read_checkpoint(str(file))["epoch"] == 2


def test_a_missing_checkpoint_or_an_empty_run_directory_is_named(tmp_path):
    from pipelines.common.checkpoints import read_checkpoint
    with pytest.raises(FileNotFoundError, match=f"model.checkpoint: no such checkpoint file or run directory "
                                                f"'{tmp_path / 'nowhere'}'"):
        read_checkpoint(str(tmp_path / "nowhere"), what="model.checkpoint")
    (tmp_path / "checkpoint_epoch_0001_step_000000010").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--checkpoint: the folder .* holds no checkpoint_epoch_\*_step_\*/"
                                                r"checkpoint.pth"):
        read_checkpoint(str(tmp_path))
