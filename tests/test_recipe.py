import pytest
import torch

from mae import create_model
from mae.recipe import build_optimizer, fractional_epoch, lr_at, param_groups, scaled_lr, set_lr

# lr=1e-3, min_lr=1e-5, 5 warmup epochs of 40, values worked out by hand:
# warmup: lr * t / 5; cosine: 1e-5 + 0.99e-3 * 0.5 * (1 + cos(pi * (t - 5) / 35))
LR_TABLE = [
    (0.0, 0.0),
    (1.0, 2.0e-4),
    (2.5, 5.0e-4),
    (4.9, 9.8e-4),
    (5.0, 1.0e-3),  # peak
    (10.0, 9.50979589e-4),  # cos(pi/7) = 0.9009688679
    (22.5, 5.05e-4),  # half way: cos(pi/2) = 0
    (40.0, 1.0e-5),  # min_lr at the end
]


@pytest.mark.parametrize("epoch,expected", LR_TABLE)
def test_lr_at_warmup_peak_and_cosine(epoch, expected):
    assert lr_at(epoch, lr=1e-3, min_lr=1e-5, warmup_epochs=5, epochs=40) == pytest.approx(expected, rel=1e-7, abs=1e-15)


def test_lr_is_set_from_the_fractional_epoch():
    assert fractional_epoch(3, 5, 10) == 3.5
    assert lr_at(fractional_epoch(0, 156, 312), 1e-3, 0.0, 1, 40) == pytest.approx(0.5e-3)


def test_scaled_lr_uses_effective_batch():
    assert scaled_lr(1.5e-4, effective_batch=64 * 1 * 64) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, effective_batch=64 * 8 * 8) == pytest.approx(2.4e-3)
    assert scaled_lr(1e-3, 32 * 2 * 2) == pytest.approx(0.5e-3)


def test_param_groups_no_decay_on_biases_and_norms_frozen_excluded():
    model = create_model("mae_vit_tiny_patch4")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith(".bias") or "norm" in n for n in nd)
    assert {"norm.weight", "decoder_norm.weight", "blocks.0.norm1.weight", "patch_embed.proj.bias"} <= nd
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight",
            "cls_token", "mask_token"} <= d  # tokens are decayed, as timm's add_weight_decay does
    assert "pos_embed" not in nd | d and "decoder_pos_embed" not in nd | d
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert nd | d == trainable and not nd & d


def test_adamw_betas_and_lr_scale():
    opt = build_optimizer(create_model("mae_vit_tiny_patch4"), lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    opt.param_groups[0]["lr_scale"] = 0.5
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]


def test_vit_large_training_step_is_about_125_gflops_per_image():
    from mae.flops import train_flops_per_image
    with torch.device("meta"):
        vitl = create_model("mae_vit_large_patch16")
    # by hand: encoder 24 x (24*50*1024^2 + 4*50^2*1024) = 30.44 GF; decoder 8 x (24*197*512^2
    # + 4*197^2*512) = 10.55 GF; patch embed 0.31 GF, decoder embed/pred 0.05 + 0.15 GF; x3 = 124.53
    assert train_flops_per_image(vitl) / 1e9 == pytest.approx(124.53, rel=1e-3)
