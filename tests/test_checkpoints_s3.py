"""A run directory on S3 (the real moto server): its latest checkpoint is found and read, and
the commands export.py, visualize.py and evaluate.py's feature actors take it (no Ray here)."""
import io
import os
import pickle
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cluster.storage import open_storage
from mae import create_model
from mae.checkpoint import checkpoint_dir_name, model_state
from pipelines import evaluate, export, visualize
from pipelines.common.checkpoints import locate_checkpoint, read_checkpoint

TINY = "mae_vit_tiny_patch4"
EARLIER, LATEST = checkpoint_dir_name(1, 44), checkpoint_dir_name(2, 88)


def tiny_checkpoint(seed: int) -> dict:
    torch.manual_seed(seed)
    model = create_model(TINY, img_size=16)
    return {"model": model.state_dict(), "epoch": seed, "config": {"model": {"name": TINY, "input_size": 16}}}


@pytest.fixture
def s3_run(s3_server) -> str:
    """s3://runs/<unique>/run holding two checkpoints of the tiny MAE (epochs 1 and 2), a
    checkpoint folder whose upload has not finished, and the run's other files."""
    uri = f"s3://runs/{uuid.uuid4().hex}/run"
    store = open_storage(uri, s3_server)
    for epoch, folder in ((1, EARLIER), (2, LATEST)):
        buffer = io.BytesIO()
        torch.save(tiny_checkpoint(epoch), buffer)
        store.write(f"{folder}/checkpoint.pth", buffer.getvalue())
    store.write(f"{checkpoint_dir_name(3, 132)}/.upload.tmp", b"")  # under way: no checkpoint.pth yet
    store.write("metrics.jsonl", "{}\n")
    return uri


def test_the_latest_checkpoint_of_an_s3_run_directory_is_found_and_read(s3_run, s3_server):
    store, name = locate_checkpoint(s3_run, s3_server)
    assert name == f"{LATEST}/checkpoint.pth" and store.child(name).uri == f"{s3_run}/{LATEST}/checkpoint.pth"
    ckpt = read_checkpoint(s3_run, s3_server)
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["model"]["pos_embed"], tiny_checkpoint(2)["model"]["pos_embed"])
    earlier = read_checkpoint(f"{s3_run}/{EARLIER}/checkpoint.pth", s3_server)  # a file is itself
    assert earlier["epoch"] == 1
    with pytest.raises(FileNotFoundError, match=f"--checkpoint: no such checkpoint file or run directory "
                                                f"'{s3_run}/nowhere'"):
        read_checkpoint(f"{s3_run}/nowhere", s3_server)
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint_epoch_\*_step_\*/checkpoint.pth"):
        read_checkpoint(f"{s3_run}/{checkpoint_dir_name(3, 132)}", s3_server)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_checkpoint_on_s3_that_would_run_code_is_refused(s3_server):
    uri = f"s3://runs/{uuid.uuid4().hex}/evil.pth"
    buffer = io.BytesIO()
    torch.save({"model": {}, "x": Payload()}, buffer)
    open_storage(uri.rpartition("/")[0], s3_server).write("evil.pth", buffer.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_checkpoint(uri, s3_server)


def test_export_reads_an_s3_run_directory(s3_run, s3_server, tmp_path, capsys):
    out = tmp_path / "encoder.safetensors"
    assert export.main(["--checkpoint", s3_run, "--s3-endpoint", s3_server, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    latest = model_state(tiny_checkpoint(2))
    assert torch.equal(load_file(out)["patch_embed.proj.weight"], latest["patch_embed.proj.weight"])

    # the keys from a credentials file (mode 600) instead of the environment; moto takes any
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    os.chmod(credentials, 0o600)
    hf = tmp_path / "hf"
    assert export.main(["--checkpoint", s3_run, "--s3-endpoint", s3_server, "--s3-credentials-file",
                        str(credentials), "--to", "hf", "--out", str(hf)]) == 0
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    os.chmod(credentials, 0o644)
    assert export.main(["--checkpoint", s3_run, "--s3-endpoint", s3_server, "--s3-credentials-file",
                        str(credentials), "--out", str(tmp_path / "refused.safetensors")]) == 2
    assert "readable by others" in capsys.readouterr().err


def test_visualize_and_the_evaluate_actors_read_an_s3_checkpoint(s3_run, s3_server, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / f"{i}.JPEG")
    out = tmp_path / "figure.png"
    assert visualize.main(["--checkpoint", s3_run, "--s3-endpoint", s3_server, "--images", str(images),
                           "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and f"{TINY} at 16px" in capsys.readouterr().out

    # what evaluate.py hands each feature actor: the file it located, and the S3 settings
    store, name = locate_checkpoint(s3_run, s3_server)
    s3 = dict(endpoint=s3_server, region=None, credentials_file=None)
    features = evaluate.Features(store.child(name).uri, s3, random_init=False, classes=["images"])
    batch = {"bytes": np.array([(images / "0.JPEG").read_bytes()], dtype=object),
             "path": np.array([str(images / "images" / "0.JPEG")])}
    assert features(batch)["features"].shape == (1, 64)
    assert torch.equal(features.model.cls_token, tiny_checkpoint(2)["model"]["cls_token"])


def test_results_reads_the_best_epoch_of_run_directories_on_s3(s3_server, capsys):
    """results.py, like every command that takes a run directory, takes an s3:// one."""
    import json

    import yaml

    from pipelines import results
    uri = f"s3://runs/{uuid.uuid4().hex}/ft"
    store = open_storage(uri, s3_server)
    epochs = [{"epoch": e, "train_loss": 1.0, "val_top1": top1, "val_top5": 90.0 + e} for e, top1 in
              enumerate([50.0, 80.0, 80.0, 70.0])]
    store.write("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in epochs))
    store.write("config.yaml", yaml.safe_dump({"train": {"task": "finetune"}, "model": {"checkpoint": None}}))
    assert results.main([uri, "--s3-endpoint", s3_server, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["task"], row["start"], row["best_epoch"], row["val_top1"], row["epochs"]) == \
        ("finetune", "random init", 1, 80.0, 4)  # the first of equal epochs
    assert results.main([uri, "--s3-endpoint", s3_server]) == 0  # for a person: a table, no JSON
    head, rule, line, blank, plots, curve = capsys.readouterr().out.splitlines()
    assert head.split() == ["run", "task", "start", "best", "top-1", "top-5", "best", "epoch"] and set(rule) <= {"-", " "}
    assert line.split() == [uri, "finetune", "random", "init", "80.00%", "91.00%", "1", "of", "4"]
    assert plots.endswith("as plots:") and curve.strip() == f"{uri}/loss_curve.png"
    assert results.main([f"s3://runs/{uuid.uuid4().hex}/none", "--s3-endpoint", s3_server]) == 2
    assert "has no evaluated epoch" in capsys.readouterr().err


@pytest.mark.slow  # waits out the S3 client's retries
def test_a_checkpoint_upload_is_retried_kept_until_it_lands_and_a_final_failure_is_raised(s3_server, tmp_path):
    """The upload function Ray Train calls, against the S3 server behind a proxy answering
    503 SlowDown: past the S3 client's 3 attempts it lands on our retry, the staged copy kept
    until then; refused every time, it raises, and raises the same at once when called again
    (Ray Train's own retry), as the training thread's next wait does."""
    from cluster.storage import Retry
    from pipelines.worker.checkpointing import CheckpointError, CheckpointWriter
    from s3_proxy import SLOW_DOWN, S3Proxy
    refusals, staged = {"n": 4}, []

    def throttle(method, path, headers):
        if method == "PUT" and "checkpoint.pth" in path and refusals["n"]:
            refusals["n"] -= 1
            staged.append((folder / "checkpoint.pth").exists())
            return SLOW_DOWN
    proxy = S3Proxy(s3_server, throttle)
    uri = f"s3://runs/{uuid.uuid4().hex}/run"
    writer = CheckpointWriter(open_storage(uri, proxy.endpoint), retry=Retry(2, 0.05), timeout=0.5)
    host = tiny_checkpoint(1)
    for name, refused in (("landed", 4), ("lost", 10**6)):
        refusals["n"] = refused
        folder = tmp_path / name
        folder.mkdir()
        writer.idle.clear()
        writer.in_flight = name
        if name == "landed":
            checkpoint = writer._persist(host, str(folder), name, best=False)
            assert checkpoint.path == f"{open_storage(uri, s3_server).root}/landed" and refusals["n"] == 0
            assert read_checkpoint(f"{uri}/landed/checkpoint.pth", s3_server)["epoch"] == 1
            writer.wait()
        else:
            with pytest.raises(CheckpointError, match=r"^checkpoint lost was not saved to s3://runs/\w+/run "
                                                      r"\(retries: 2\): .*AWS Error SLOW_DOWN"):
                writer._persist(host, str(folder), name, best=False)
            puts = len(proxy.log)
            with pytest.raises(CheckpointError, match="checkpoint lost was not saved"):  # called again: at once
                writer._persist(host, str(folder), name, best=False)
            assert len(proxy.log) == puts
            with pytest.raises(CheckpointError, match="checkpoint lost was not saved"):
                writer.wait()
            assert open_storage(uri, s3_server).read("lost/checkpoint.pth") is None
        assert all(staged) and not folder.exists() and writer.idle.is_set()  # staged until the end
    writer.idle.clear()  # a store that never answers: the next checkpoint does not wait forever
    writer.in_flight = "hung"
    with pytest.raises(CheckpointError, match=r"checkpoint hung is not in s3://runs/\w+/run after "
                                              r"run.checkpoint_timeout_seconds=0.5: the store does not answer"):
        writer.wait()
    proxy.close()
