"""Encoder export to timm: key mapping, numerical equality with our encoder, and the CLI."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from mae import create_model
from mae.export import encoder_state_for_timm, timm_model_name
from pipelines.export import main
from pipelines.worker.tasks import timm_name_or_none

ROOT = Path(__file__).resolve().parents[1]
TINY = "mae_vit_tiny_patch4"
PAPER = {"mae_vit_base_patch16": "vit_base_patch16_224", "mae_vit_large_patch16": "vit_large_patch16_224",
         "mae_vit_huge_patch14": "vit_huge_patch14_224"}


def perturbed_tiny_mae() -> torch.nn.Module:
    """The tiny preset with every parameter moved off its init (norms, biases, cls position row)."""
    torch.manual_seed(0)
    model = create_model(TINY, img_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_timm_vit(num_classes: int = 10) -> VisionTransformer:
    """timm's ViT with the tiny preset's shapes, built as timm's vit_* presets are (class token,
    'token' pooling, qkv bias, LayerNorm eps 1e-6 by default)."""
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                             num_classes=num_classes).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = perturbed_tiny_mae()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": {"model": TINY, "input_size": 16},
                "config": {"model": {"name": TINY, "input_size": 16}}}, path)
    return model, path


def test_exported_encoder_matches_ours_in_timm(tiny_checkpoint, tmp_path, capsys):
    model, path = tiny_checkpoint
    out = tmp_path / "encoder.safetensors"
    assert main(["--checkpoint", str(path), "--to", "timm", "--out", str(out)]) == 0
    assert "records no preset with a timm model" in capsys.readouterr().out

    vit = tiny_timm_vit()
    missing, unexpected = vit.load_state_dict(load_file(out), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []

    x = torch.randn(3, 3, 16, 16)
    length = model.patch_embed.num_patches
    identity_order = torch.arange(length).float().expand(len(x), length)
    with torch.no_grad():
        ours, mask, _ = model.forward_encoder(x, mask_ratio=0.0, noise=identity_order)
        theirs = vit.forward_features(x)
    assert mask.sum() == 0 and ours.shape == theirs.shape == (3, 1 + length, 32)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_timm_pretrained_loader_accepts_the_file(tiny_checkpoint, tmp_path):
    """timm's own loading path (the one `pretrained_cfg_overlay=dict(file=...)` takes), with its ViT
    checkpoint filter, and `num_classes=0` in the config so the head may be absent."""
    model, path = tiny_checkpoint
    out = tmp_path / "encoder.safetensors"
    assert main(["--checkpoint", str(path), "--out", str(out)]) == 0
    vit = tiny_timm_vit(num_classes=10)
    cfg = dict(file=str(out), num_classes=0, classifier="head", first_conv="patch_embed.proj")
    timm.models.load_pretrained(vit, pretrained_cfg=cfg, num_classes=10, filter_fn=checkpoint_filter_fn)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in encoder_state_for_timm(model.state_dict()).items())


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_presets_have_timm_keys_and_shapes(preset):
    with torch.device("meta"):
        ours = encoder_state_for_timm(create_model(preset).state_dict())
        theirs = timm.create_model(PAPER[preset], pretrained=False, num_classes=1000).state_dict()
    assert timm_model_name(preset, 224) == PAPER[preset]
    expected = {k: v.shape for k, v in theirs.items() if not k.startswith("head.")}
    assert {k: v.shape for k, v in ours.items()} == expected


def test_small_presets_have_no_timm_name():
    with pytest.raises(ValueError, match=TINY):
        timm_model_name(TINY, 16)
    with pytest.raises(ValueError, match="mae_vit_large_patch16"):
        timm_model_name("mae_vit_large_patch16", 200)


def test_official_encoder_only_state_converts_like_the_full_one():
    full = perturbed_tiny_mae().state_dict()
    encoder_only = {k: v for k, v in full.items() if not k.startswith("decoder_") and k != "mask_token"}
    a, b = encoder_state_for_timm(full), encoder_state_for_timm(encoder_only)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("decoder", "mask_token", "head")) for k in a)
    assert all(v.is_contiguous() and v.data_ptr() != full[k].data_ptr() for k, v in a.items())


def test_not_an_mae_state_dict_is_refused():
    with pytest.raises(ValueError, match="not an MAE state dict"):
        encoder_state_for_timm({"weight": torch.zeros(1)})


def test_official_release_checkpoint_prints_no_name(tmp_path, capsys):
    state = create_model("mae_vit_tiny_patch4").state_dict()
    torch.save({"model": state}, tmp_path / "mae_pretrain.pth")
    assert main(["--checkpoint", str(tmp_path / "mae_pretrain.pth"), "--out", str(tmp_path / "e.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "records no preset" in printed and "timm.create_model(" in printed


def test_timm_name_comes_from_the_recorded_preset():
    large = "mae_vit_large_patch16"
    assert timm_name_or_none({"model": {}, "args": {"model": large, "input_size": 224}}, 224) == PAPER[large]
    assert timm_name_or_none({"model": {}, "config": {"model": {"name": large}}}, 224) == PAPER[large]
    assert timm_name_or_none({"model": {}, "args": argparse.Namespace(model=large)}, 224) == PAPER[large]
    assert timm_name_or_none({"model": {}}, 224) is None
    assert timm_name_or_none({"model": {}, "args": {"model": TINY}}, 16) is None


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "error: --checkpoint: no such checkpoint file or run directory" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists()


def test_unknown_target_is_an_argparse_error(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(path), "--to", "onnx", "--out", str(tmp_path / "e.onnx")])
    assert exc.value.code == 2


def test_cli_as_a_script(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    out = tmp_path / "sub" / "encoder.safetensors"
    result = subprocess.run([sys.executable, "pipelines/export.py", "--checkpoint", str(path), "--to", "timm",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "load it with: timm.create_model(" in result.stdout


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_classifier_exports_to_timms_vit_base_with_identical_logits(task, tmp_path, capsys):
    from mae.checkpoint import save_checkpoint
    from mae.classifier import create_classifier

    torch.manual_seed(0)
    model = create_classifier("mae_vit_base_patch16", 224, 7, task)
    with torch.no_grad():  # a trained head and BatchNorm statistics, not their initial values
        for name, p in model.named_parameters():
            if name.startswith(("head", "fc_norm")):
                p.normal_(0, 0.1)
        if task == "linprobe":
            model.head[0].running_mean.normal_(0, 0.5)
            model.head[0].running_var.uniform_(0.5, 2.0)
    config = {"model": {"name": "mae_vit_base_patch16", "input_size": 224, "global_pool": True},
              "train": {"task": task}}
    path, out = tmp_path / "checkpoint.pth", tmp_path / "classifier.safetensors"
    save_checkpoint({"model": model.state_dict(), "config": config}, path)
    assert main(["--checkpoint", str(path), "--to", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pool = "avg" if task == "finetune" else "token"
    assert f'timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=7, global_pool="{pool}"' in printed
    vit = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=7, global_pool=pool,
                            pretrained_cfg_overlay=dict(file=str(out), num_classes=7)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert main(["--checkpoint", str(path), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
