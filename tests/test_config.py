import os
from pathlib import Path

import pytest

from pipelines.common.config import ConfigError, check_epoch, head_classes, load_config
from pipelines.pretrain import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["mae_vit_base", "mae_vit_large", "mae_vit_huge"])
def test_paper_configs_are_the_paper_recipe(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["data.path=/datasets/imagenet"])
    assert cfg.effective_batch == 4096
    assert cfg.optim.blr == 1.5e-4 and cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 40
    assert cfg.train.epochs == 800 and cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
    assert cfg.model.name.startswith(name) and cfg.model.input_size == 224


@pytest.mark.parametrize("name", ["mae_vit_base", "mae_vit_large", "mae_vit_huge", "demo", "debug"])
def test_every_config_opens_with_command_hardware_time_and_loss(name):
    head = (CONFIGS / f"{name}.yaml").read_text().split("\n\n")[0].lower()
    for word in ("pretrain.py" if name.startswith("mae") else "make demo" if name == "demo" else "pretrain.py",
                 "hardware", "time", "loss"):
        assert word in head, (name, word)


def test_overrides_set_the_documented_keys(tmp_path):
    cfg = load_config(CONFIGS / "mae_vit_large.yaml", [
        "scaling.num_workers=64", "data.path=/datasets/imagenet", "run.name=vitl-800",
        f"run.storage_path={tmp_path}", "train.epochs=1600", "train.batch_size=32", "optim.blr=1e-4",
        "optim.lr=null", "model.norm_pix_loss=false"])
    assert cfg.scaling.num_workers == 64 and cfg.data.path == "/datasets/imagenet"
    assert cfg.run.name == "vitl-800" and cfg.run_storage().uri == str(tmp_path / "vitl-800")
    assert cfg.train.epochs == 1600 and cfg.train.batch_size == 32 and cfg.optim.blr == 1e-4
    assert cfg.optim.lr is None and cfg.model.norm_pix_loss is False


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", r"train.epoch: unknown key; train has \[.*'epochs'"),
    ("trian.epochs=3", r"trian.epochs: unknown section 'trian'; sections are \['model', 'data'"),
    ("train.epochs=three", r"train.epochs: expected an integer, got 'three'"),
    ("train.batch_size=1.5", r"train.batch_size: expected an integer, got 1.5"),
    ("train.batch_size=0", r"train.batch_size: 0 is not allowed; must be >= 1"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of \['fp32', 'bf16', 'fp16'\]"),
    ("model.name=vit_b", r"model.name: 'vit_b' is not allowed; choose one of \[.*'mae_vit_base_patch16'"),
    ("model.mask_ratio=1.5", r"model.mask_ratio: 1.5 is not allowed; must be in \(0, 1\)"),
    ("model.input_size=100", r"model.input_size: 100 is not allowed; must be a positive multiple of .* 16"),
    ("model.norm_pix_loss=maybe", r"model.norm_pix_loss: expected true or false, got 'maybe'"),
    ("scaling.accelerator=tpu", r"scaling.accelerator: 'tpu' is not allowed; choose one of \['cpu', 'cuda', 'npu', 'sdaa'\]"),
    ("scaling.device_type=tpu", r"scaling.device_type: 'tpu' is not allowed; null or one of \['cpu', 'cuda', 'npu'"),
    ("run.storage_path=gs://b/x", r"run.storage_path: 'gs://b/x' is not allowed; a local/NFS folder or s3://"),
    ("run.keep_checkpoints=0", r"run.keep_checkpoints: 0 is not allowed; null or >= 1"),
    ("optim.warmup_epochs=900", r"optim.warmup_epochs: 900.0 is not allowed; must be >= 0 and < train.epochs"),
    ("train.epochs", r"'train.epochs': overrides look like section.key=value"),
    ("optim.min_lr=0.01", r"optim.min_lr: 0.01 is not allowed; must be <= the peak lr \(0.0024: optim.blr 0.00015 x "
                          r"effective batch 4096 / 256\)"),  # the schedule would rise
])
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "mae_vit_large.yaml", ["data.path=/x", override])


@pytest.mark.parametrize("key", ["optim.lr", "optim.min_lr", "optim.weight_decay", "run.lease_ttl_seconds",
                                 "data.retry_backoff_seconds", "optim.blr"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_non_finite_numbers_are_refused_with_one_line_and_exit_2(key, value, tmp_path, capsys):
    assert main(["--config", str(CONFIGS / "debug.yaml"), f"{key}={value}", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()  # YAML reads .inf as a float, inf as a string
    assert err.startswith(f"error: {key}: expected a finite number, got ") and "\n" not in err, err
    assert not list(tmp_path.iterdir())  # no run directory, no lease


def test_a_min_lr_above_the_peak_is_refused_also_against_an_explicit_lr(tmp_path, capsys):
    assert main(["--config", str(CONFIGS / "debug.yaml"), "optim.lr=1e-4", "optim.min_lr=2e-4",
                 f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: optim.min_lr: 0.0002 is not allowed; must be <= the peak lr (0.0001: optim.lr)"
    load_config(CONFIGS / "debug.yaml", ["data.path=/x", "optim.lr=1e-4", "optim.min_lr=1e-4"])  # equal: flat


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: mae_vit_tiny_patch4\n  depht: 3\ndata:\n  path: /x\n")
    with pytest.raises(ConfigError, match=r"model.depht: unknown key; model has \["):
        load_config(bad)


def test_entry_point_exits_2_with_one_line_before_any_work(tmp_path, capsys):
    assert main(["--config", str(CONFIGS / "debug.yaml"), "train.epochs=zero"]) == 2
    assert capsys.readouterr().err.strip() == "error: train.epochs: expected an integer, got 'zero'"
    assert main(["--config", str(CONFIGS / "debug.yaml"), f"data.path={tmp_path / 'none'}",
                 "data.build_demo=false", f"run.storage_path={tmp_path}"]) == 2
    assert "has no train/ folder" in capsys.readouterr().err
    assert not (tmp_path / "debug").exists()  # nothing written before the error


def test_an_elastic_range_keeps_the_effective_batch_at_every_size():
    cfg = load_config("configs/debug.yaml", ["scaling.min_workers=2", "scaling.num_workers=3", "train.batch_size=4",
                                             "train.effective_batch=24"])
    assert list(cfg.worker_counts) == [2, 3]
    assert [cfg.accum_iter(w) * w * 4 for w in cfg.worker_counts] == [24, 24]
    assert (cfg.accum_iter(2), cfg.accum_iter(3)) == (3, 2)
    # without train.effective_batch, the effective batch is the one at scaling.num_workers
    cfg = load_config("configs/debug.yaml", ["scaling.min_workers=1", "scaling.num_workers=2", "train.accum_iter=2"])
    assert cfg.effective_batch == 32 * 2 * 2 and (cfg.accum_iter(1), cfg.accum_iter(2)) == (4, 2)


@pytest.mark.parametrize("overrides, message", [
    (["scaling.min_workers=2", "scaling.num_workers=5", "train.batch_size=4", "train.effective_batch=24"],
     "train.effective_batch: 24 is not allowed; 24 images per step cannot be split into micro-batches of "
     "train.batch_size=4 at 4, 5 workers"),
    (["scaling.min_workers=3", "scaling.num_workers=2"], "scaling.min_workers: 3 is not allowed"),
    (["train.effective_batch=128", "train.accum_iter=3"], "train.effective_batch: 128 is not allowed; set it or "
                                                          "train.accum_iter, not both"),
])
def test_elastic_sizes_that_cannot_keep_the_recipe_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", overrides)
    assert str(e.value).startswith(message)


def test_local_paths_are_made_absolute_once_validated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "debug.yaml", ["data.path=~/imagenet", "run.storage_path=runs"])
    assert cfg.data.path == os.path.expanduser("~/imagenet") and cfg.run.storage_path == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="data.path: '' is not allowed; set it"):  # not the working directory
        load_config(CONFIGS / "debug.yaml", ["data.path="])


def test_the_checks_against_the_data_name_the_key(digits):
    cfg = load_config(CONFIGS / "debug.yaml", [f"data.path={digits}"])  # 2 workers, batches of 32
    check_epoch(cfg, 64)
    with pytest.raises(ConfigError, match="train.batch_size: 63 images over 2 workers give 0 batches of 32 per "
                                          "epoch, fewer than the 1 micro-batches of one optimizer step of 64"):
        check_epoch(cfg, 63)
    cfg = load_config(CONFIGS / "finetune_demo.yaml", [f"data.path={digits}"])
    train, val = cfg.data.open(), cfg.data.open_val()  # <path>/train/, <path>/val/
    assert (len(train), len(val), head_classes(cfg, train.classes)) == (1438, 359, 10)
    assert val.classes == train.classes
    with pytest.raises(ConfigError, match="model.num_classes: the data names no classes"):
        head_classes(cfg, ["only"])
    cfg.data.val_path = str(digits / "val")  # <val_path>/<class>/<image>
    assert cfg.data.open_val().files == val.files
    cfg.data.val_path, cfg.data.format = None, "webdataset"
    with pytest.raises(ConfigError, match="data.val_path: webdataset shards need it"):
        cfg.data.open_val()
