"""evaluate.py and visualize.py on tiny real JPEG sets, with our and official-style checkpoints."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mae import create_model
from mae.checkpoint import architecture_of, model_from_checkpoint
from pipelines import evaluate, visualize


def _stripes(root, n_per_class=12):
    """Two classes a random encoder can tell apart: horizontal vs vertical stripes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, axis in (("horizontal", 0), ("vertical", 1)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                period = rng.integers(3, 7)
                wave = (np.arange(32) // period % 2 * 200 + 30).astype(np.uint8)
                img = np.repeat(wave[:, None], 32, 1) if axis == 0 else np.repeat(wave[None, :], 32, 0)
                noisy = np.clip(img[..., None] + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(folder / f"{i}.JPEG", quality=90)
    return root


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = create_model("mae_vit_tiny_patch4", img_size=16, norm_pix_loss=True)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 0,
                "config": {"model": {"name": "mae_vit_tiny_patch4", "norm_pix_loss": True}}}, path)
    return path, model


@pytest.mark.slow  # a whole command end to end on the cluster
def test_evaluate_prints_linear_and_knn_top1_for_trained_and_random_init(ray_client, tmp_path, tiny_checkpoint,
                                                                         capsys):
    data = _stripes(tmp_path / "stripes")
    for name in ("checkpoint_epoch_0002_step_000000088", "checkpoint_epoch_0003_step_000000132"):
        (tmp_path / "run" / name).mkdir(parents=True)
        torch.save({}, tmp_path / "run" / name / "checkpoint.pth")  # the latest is evaluated
    tiny_checkpoint[0].replace(tmp_path / "run" / name / "checkpoint.pth")
    assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--compare-random-init"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for r in result.values():
        assert r["train_images"] == 24 and r["val_images"] == 24 and r["feature_dim"] == 64
        assert r["linear_top1"] >= 0.9 and r["knn_top1"] >= 0.9
    assert "checkpoint_epoch_0003_step_000000132/checkpoint.pth" in out and "random-init encoder" in out


def test_knn_votes_by_cosine_similarity():
    train_x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = np.array([0, 0, 1])
    val_x = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert evaluate.knn(train_x, train_y, val_x, np.array([0, 1]), k=1) == 1.0
    assert evaluate.knn(train_x, train_y, val_x, np.array([1, 0]), k=1) == 0.0


def test_encoder_features_are_cls_and_mean_patch_tokens_in_image_order(tiny_checkpoint):
    _, model = tiny_checkpoint
    imgs = torch.randn(2, 3, 16, 16)
    feats = evaluate.encoder_features(model, imgs)
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)
    torch.testing.assert_close(feats, torch.cat([x[:, 0], x[:, 1:].mean(1)], 1), atol=1e-5, rtol=0)


def test_official_style_checkpoints_are_recognised(tiny_checkpoint):
    _, model = tiny_checkpoint
    state = model.state_dict()
    assert architecture_of(state) == "mae_vit_tiny_patch4"
    full, name = model_from_checkpoint({"model": state})
    assert name == "mae_vit_tiny_patch4" and full.patch_embed.img_size == (16, 16) and not full.norm_pix_loss
    encoder_only = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    enc, _ = model_from_checkpoint({"model": encoder_only}, require_decoder=False)
    torch.testing.assert_close(enc.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="holds only an encoder"):
        model_from_checkpoint({"model": encoder_only})


def test_visualize_writes_the_figure_and_rejects_bad_input(tmp_path, tiny_checkpoint, capsys):
    data = _stripes(tmp_path / "stripes", n_per_class=3)
    out = tmp_path / "figs" / "x.png"
    assert visualize.main(["--checkpoint", str(tiny_checkpoint[0]), "--images", str(data / "val"),
                           "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.height > 6 * 96 and im.width > 4 * 96  # 6 images x 4 columns
    assert "norm_pix_loss=True" in capsys.readouterr().out
    assert visualize.main(["--checkpoint", str(tmp_path / "nope.pth"), "--images", str(data), "--out", str(out)]) == 2
    assert "error: --checkpoint: no such checkpoint file or run directory" in capsys.readouterr().err
