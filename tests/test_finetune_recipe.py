"""Fine-tuning and linear-probing pieces against the official code's goldens
(tests/golden/make_finetune_reference.py), and the augmentation pipeline's distributions."""
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae import create_model
from mae.classifier import create_classifier, load_pretrained, timm_state
from mae.recipe import LARS, param_groups_lrd
from mae.transforms import Augment, decode_crop_batch
from pipelines.worker.tasks import Objective, evaluate
from pipelines.common.config import load_config
from conftest import PAPER_FINETUNE

GOLDEN = Path(__file__).parent / "golden"
PRESETS = {"vit_base_patch16": "mae_vit_base_patch16", "vit_large_patch16": "mae_vit_large_patch16",
           "vit_huge_patch14": "mae_vit_huge_patch14"}


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "finetune_reference.json").read_text())


@pytest.mark.parametrize("official", sorted(PRESETS))
def test_layer_decay_groups_equal_the_official_param_groups_lrd(golden, official):
    want = golden[official]
    with torch.device("meta"):
        model = create_classifier(PRESETS[official], 224, 1000, "finetune", drop_path=want["drop_path_rate"])
    groups = param_groups_lrd(model, 0.05, set(model.no_weight_decay()), want["layer_decay"])
    names = {id(p): n for n, p in model.named_parameters()}
    got = [{"name": g["name"], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
            "params": [names[id(p)] for p in g["params"]]} for g in groups]
    assert [g["name"] for g in got] == [g["name"] for g in want["groups"]]
    for ours, theirs in zip(got, want["groups"]):
        assert ours["params"] == theirs["params"], ours["name"]
        assert ours["weight_decay"] == theirs["weight_decay"], ours["name"]
        assert ours["lr_scale"] == pytest.approx(theirs["lr_scale"], rel=1e-12), ours["name"]
    assert {n for n, p in model.named_parameters()} == {n for g in want["groups"] for n in g["params"]}


def test_linear_probe_model_has_the_official_keys_and_trains_the_head_only(golden):
    want = golden["linprobe"]
    with torch.device("meta"):
        model = create_classifier("mae_vit_base_patch16", 224, want["num_classes"], "linprobe")
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == want["state_dict"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == want["requires_grad"]


def test_lars_steps_equal_the_official_lars():
    ref = torch.load(GOLDEN / "lars_reference.pt", weights_only=True)
    for case in ref["cases"]:
        head = torch.nn.Sequential(torch.nn.BatchNorm1d(64, affine=False, eps=1e-6), torch.nn.Linear(64, 10))
        head.load_state_dict(ref["state_dict"])
        with torch.no_grad():
            for name, p in head.named_parameters():
                p.copy_(case["init_params"][name])
        params = dict(head.named_parameters())
        opt = LARS(head.parameters(), lr=case["lr"], weight_decay=case["weight_decay"], momentum=case["momentum"],
                   trust_coefficient=case["trust_coefficient"])
        for grads, want in zip(ref["grads"], case["steps"]):
            for name, p in params.items():
                p.grad = grads[name].clone()
            opt.step()
            for name, p in params.items():
                torch.testing.assert_close(opt.state[p]["mu"], want["mu"][name], rtol=1e-6, atol=1e-12)
                torch.testing.assert_close(p.detach() - case["init_params"][name],
                                           want["params"][name] - case["init_params"][name], rtol=1e-5, atol=1e-10)


def _jpeg(seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_finetune_view_applies_timms_own_rand_augment_as_create_transform_builds_it():
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    blobs = [_jpeg(i) for i in range(32)]
    plain = Augment((0.08, 1.0))
    auto = Augment((0.08, 1.0), "rand-m9-mstd0.5-inc1")
    a, ok_a, err_a = decode_crop_batch(blobs, 32, [np.random.default_rng([5, i]) for i in range(32)], augment=plain)
    b, ok_b, err_b = decode_crop_batch(blobs, 32, [np.random.default_rng([5, i]) for i in range(32)], augment=auto)
    assert a.shape == b.shape == (32, 32, 32, 3) and a.dtype == b.dtype == np.uint8
    assert ok_a == ok_b == list(range(32)) and not err_a and not err_b
    official = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                                re_prob=0.25, re_mode="pixel", re_count=1)  # main_finetune.py's build_transform
    timm_ra = next(t for t in official.transforms if isinstance(t, RandAugment))
    want = []
    for i, crop in enumerate(a):  # timm draws its ops from numpy's global generator, the rest from `random`:
        rng = np.random.default_rng([5, i])  # each image seeds both from its own generator, after its crop's draws
        decode_crop_batch([blobs[i]], 32, rng, augment=plain)
        seeds = rng.integers(2**32, size=2)
        random.seed(int(seeds[0])), np.random.seed(int(seeds[1]))
        want.append(np.asarray(timm_ra(Image.fromarray(crop))))
    np.testing.assert_array_equal(b, np.stack(want))  # the same crops through timm's own ops, same draws, same pixels
    assert sum(not np.array_equal(x, y) for x, y in zip(a, b)) >= 12  # 2 ops per image, each p=0.5


def test_rand_augment_posterize_to_zero_bits_is_a_black_image_not_an_error():
    from timm.data.auto_augment import RandAugment
    from mae.transforms import rand_augment_op
    op = rand_augment_op("rand-m10-inc1", 32)  # magnitude 10: increasing posterize keeps 0 bits
    posterize = next(o for o in op.ops if o.name == "PosterizeIncreasing")
    posterize.prob, only = 1.0, RandAugment([posterize], num_layers=1)
    out = np.asarray(only(Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))))
    assert out.shape == (32, 32, 3) and not out.any()


def _cfg(*overrides):
    """The demo's fine-tuning config with the paper's regularisers back on."""
    return load_config("configs/finetune_demo.yaml", ["data.path=/nonexistent", *PAPER_FINETUNE, *overrides])


def test_mixup_cutmix_targets_are_soft_rows_summing_to_one_with_smoothing():
    torch.manual_seed(0)
    random.seed(0)
    objective = Objective(_cfg(), num_classes=10, device=torch.device("cpu"))
    images = torch.randn(64, 3, 32, 32)
    labels = torch.arange(64) % 10
    out, targets = objective.inputs(images.clone(), labels)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert targets.shape == (64, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(64))
    assert float(targets.min()) >= 0.1 / 10 - 1e-7  # label smoothing 0.1 over 10 classes: no zero target
    top2 = targets.topk(2, dim=1).indices  # a mixed pair: image i with image 63 - i (the batch reversed)
    assert all({int(labels[i]), int(labels[63 - i])} <= set(top2[i].tolist()) | {int(labels[i])} for i in range(64))
    loss = objective(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), images, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_random_erasing_hits_about_a_quarter_of_the_images_with_normal_noise():
    random.seed(1)
    torch.manual_seed(1)
    objective = Objective(_cfg("augment.mixup=0", "augment.cutmix=0"), num_classes=10, device=torch.device("cpu"))
    images = torch.zeros(800, 3, 32, 32)
    out, targets = objective.inputs(images.clone(), torch.zeros(800, dtype=torch.long))
    erased = (out != 0).flatten(1).any(1)
    assert 0.20 < float(erased.float().mean()) < 0.30
    noise = out[erased][out[erased] != 0]
    assert abs(float(noise.mean())) < 0.05 and 0.9 < float(noise.std()) < 1.1  # per-pixel N(0, 1)
    assert targets.dtype == torch.long  # no Mixup: class indices, label smoothing in the loss
    area = (out[erased] != 0).flatten(1).float().mean(1)
    assert float(area.min()) >= 0.015 and float(area.max()) <= 1 / 3 + 0.02  # timm: 2% to 1/3 (rounded to pixels)


def test_pretrained_encoder_loads_into_the_classifier_and_folded_linear_probe_gives_the_same_logits():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4", img_size=16)
    for task in ("finetune", "linprobe"):
        clf = create_classifier("mae_vit_tiny_patch4", 16, 5, task)
        fresh = load_pretrained(clf, mae.state_dict(), task)
        assert set(fresh) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "head.1.weight",
                              "head.1.bias", "head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"}
        torch.testing.assert_close(clf.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
        assert float(clf.state_dict()[[k for k in fresh if k.endswith("weight")][-1]].std()) < \
            (0.02 if task == "linprobe" else 1e-4)
    clf.train()
    with torch.no_grad():
        clf(torch.randn(32, 3, 16, 16) * 2 + 1)  # the BatchNorm's running statistics move off 0 / 1
    clf.eval()
    from timm.models.vision_transformer import VisionTransformer
    plain = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                              num_classes=5, global_pool="token").eval()
    plain.load_state_dict(timm_state(clf))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), clf(x), rtol=1e-5, atol=1e-5)


def test_pretrained_position_embedding_is_resampled_to_another_input_size():
    mae = create_model("mae_vit_tiny_patch4", img_size=16)
    clf = create_classifier("mae_vit_tiny_patch4", 32, 3, "finetune")
    load_pretrained(clf, mae.state_dict(), "finetune")
    assert clf.pos_embed.shape == (1, 1 + 64, 32)
    torch.testing.assert_close(clf.pos_embed[:, :1], mae.pos_embed[:, :1])


def test_evaluate_counts_top1_top5_and_leaves_out_stand_ins():
    class Fixed(torch.nn.Module):  # logits favour class (label + shift) for each image
        def forward(self, x):
            scores = torch.zeros(len(x), 10)
            for i, v in enumerate(x[:, 0, 0, 0].round().long().tolist()):
                scores[i, v % 10] = 1.0
            return scores
    # normalize_on_device maps uint8 v to (v/255 - mean)/std; pick pixels whose normalised value rounds to the class
    labels = torch.tensor([0, 1, 2, 3])
    mean, std = 0.485, 0.229
    pixel = [int(round((c * std + mean) * 255)) for c in (0, 1, 2, 0)]  # last image predicts 0, label 3: a miss
    images = torch.stack([torch.full((4, 4, 3), p, dtype=torch.uint8) for p in pixel])
    batch = {"image": images, "label": labels, "skipped": torch.tensor([0, 0, 0, 0], dtype=torch.int8)}
    stand_in = {"image": images[:1], "label": labels[:1] + 5, "skipped": torch.tensor([1], dtype=torch.int8)}
    acc = evaluate(Fixed(), [batch, stand_in], torch.device("cpu"), None, world=1)
    assert (acc.images, acc.top1) == (4, 3)
    assert acc.metrics()["val_top1"] == 75.0 and acc.top5 >= acc.top1


@pytest.mark.parametrize("overrides, message", [
    (["augment.mixup=0.8"], "augment.mixup: train.task=pretrain does not use it (only fine-tuning does)"),
    (["model.checkpoint=runs/demo"], "model.checkpoint: train.task=pretrain does not use it"),
    (["optim.layer_decay=0.65"], "optim.layer_decay: train.task=pretrain does not use it"),
    (["train.task=linprobe", "augment.rand_augment=rand-m9-mstd0.5-inc1"],
     "augment.rand_augment: train.task=linprobe does not use it (only fine-tuning does)"),
    (["train.task=finetune", "augment.cutmix=1.0", "train.batch_size=33"], "train.batch_size: 33 is odd"),
    (["train.task=finetune", "augment.rand_augment=bogus"], "augment.rand_augment: 'bogus' is not a timm RandAugment"),
    (["train.task=finetune", "optim.layer_decay=1.5"], "optim.layer_decay: 1.5 is not allowed"),
    (["augment.min_scale=0"], "augment.min_scale: 0.0 is not allowed"),
])
def test_config_refuses_keys_of_another_task_and_bad_recipe_values(overrides, message):
    from pipelines.common.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/debug.yaml", ["data.path=/x", *overrides])


def test_entry_points_refuse_another_tasks_config_and_a_missing_checkpoint_before_any_work(digits, tmp_path, capsys):
    from pipelines.pretrain import main
    assert main(["--config", "configs/debug.yaml", f"data.path={digits}"], task="finetune") == 2
    assert "train.task: configs/debug.yaml is a pretrain config; run it with pipelines/pretrain.py" in \
        capsys.readouterr().err
    common = ["--config", "configs/finetune_demo.yaml", f"data.path={digits}", f"run.storage_path={tmp_path}"]
    assert main([*common, f"model.checkpoint={tmp_path / 'nowhere'}"], task="finetune") == 2
    assert f"error: model.checkpoint: no such checkpoint file or run directory '{tmp_path / 'nowhere'}'" in \
        capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main([*common, f"model.checkpoint={tmp_path / 'empty_run'}"], task="finetune") == 2
    assert "holds no checkpoint_epoch_*_step_*/checkpoint.pth" in capsys.readouterr().err
    assert main([*common, "data.format=parquet", "model.checkpoint=null"], task="finetune") == 2
    assert "data.path" in capsys.readouterr().err  # no parquet shards in an imagefolder
    assert not (tmp_path / "demo_finetune").exists()  # no run directory, no lease: nothing written


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_micro_step_under_autocast_trains_every_weight_and_probe_only_its_head(precision):
    from pipelines.worker.step import AMP_DTYPES, StepConfig, micro_step, optimizer_step
    from pipelines.worker.tasks import task_of
    for task in ("finetune", "linprobe"):
        cfg = _cfg("model.name=mae_vit_tiny_patch4", "model.input_size=16", f"train.task={task}",
                   *([] if task == "finetune" else ["augment.rand_augment=null", "augment.reprob=0", "augment.mixup=0",
                                                    "augment.cutmix=0", "augment.smoothing=0", "optim.layer_decay=1",
                                                    "model.drop_path=0"]))
        torch.manual_seed(0)
        model = task_of(cfg).model(cfg, 10)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = task_of(cfg).optimizer(model, cfg, 1e-3, fused=None)
        step = StepConfig(torch.device("cpu"), 0.75, 1, AMP_DTYPES[precision], Objective(cfg, 10, torch.device("cpu")))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
        loss = micro_step(model, images, step, scaler, labels=torch.arange(8))
        optimizer_step(optimizer, scaler)
        assert torch.isfinite(loss)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        if task == "finetune":
            assert "blocks.0.attn.qkv.weight" in moved and "head.weight" in moved
            assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
        else:
            assert moved == {"head.1.weight", "head.1.bias"} and isinstance(optimizer, LARS)
