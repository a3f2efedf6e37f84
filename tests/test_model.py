import json
from pathlib import Path

import pytest
import torch

from mae import create_model, list_models
from mae.model import MaskedAutoencoderViT, patchify, random_masking, unpatchify, masked_patch_loss

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "mae_reference.pt", weights_only=True)


def _golden_model(golden, norm_pix_loss=False):
    model = MaskedAutoencoderViT(**golden["arch"], norm_pix_loss=norm_pix_loss).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_state_dict_keys_and_shapes_match_official(name):
    official = json.loads((GOLDEN / "official_keys.json").read_text())[name]
    with torch.device("meta"):
        ours = create_model(name).state_dict()
    assert list(ours) == list(official)
    assert {k: list(v.shape) for k, v in ours.items()} == official


def test_matches_official_outputs_with_same_weights_and_noise(golden):
    for case in golden["cases"]:
        model = _golden_model(golden, case["norm_pix_loss"])
        with torch.no_grad():
            loss, pred, mask = model(golden["imgs"], mask_ratio=case["mask_ratio"], noise=case["noise"])
        torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=0)
        torch.testing.assert_close(pred, case["pred"], rtol=0, atol=1e-4)
        assert torch.equal(mask, case["mask"])


def test_noise_none_draws_torch_rand_as_reference(golden):
    case = golden["cases"][0]
    model = _golden_model(golden, case["norm_pix_loss"])
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        loss, _, mask = model(golden["imgs"], mask_ratio=case["mask_ratio"])
    assert torch.equal(mask, case["mask"])
    torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=0)


def test_fixed_sincos_pos_embed_equals_reference_and_is_frozen(golden):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**golden["arch"])
    torch.testing.assert_close(model.pos_embed, golden["init_pos_embed"], rtol=0, atol=1e-7)
    torch.testing.assert_close(model.decoder_pos_embed, golden["init_decoder_pos_embed"], rtol=0, atol=1e-7)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_initialisation_as_reference():
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16").requires_grad_(False)
    # xavier-uniform bound for Linear and for the patch projection viewed as Linear
    w = model.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5
    assert w.std() == pytest.approx((2 / sum(w.shape)) ** 0.5, rel=0.02)
    pw = model.patch_embed.proj.weight.flatten(1)
    assert pw.std() == pytest.approx((2 / sum(pw.shape)) ** 0.5, rel=0.02)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert model.cls_token.std() == pytest.approx(0.02, rel=0.15)
    assert model.mask_token.std() == pytest.approx(0.02, rel=0.15)
    assert model.norm.eps == 1e-6


@pytest.mark.parametrize("name,embed,depth,patch", [
    ("mae_vit_base_patch16", 768, 12, 16),
    ("mae_vit_large_patch16", 1024, 24, 16),
    ("mae_vit_huge_patch14", 1280, 32, 14),
])
def test_paper_presets(name, embed, depth, patch):
    with torch.device("meta"):
        m = create_model(name)
    assert m.pos_embed.shape[-1] == embed and len(m.blocks) == depth and m.patch_size == patch
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16


def test_registry_rejects_unknown_names_and_takes_overrides():
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'vit_nope'.*mae_vit_base_patch16"):
        create_model("vit_nope")
    assert create_model("mae_vit_tiny_patch4", norm_pix_loss=True).norm_pix_loss


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.3])
def test_masking_keeps_exact_count_and_restore_inverts_shuffle(ratio):
    n, length, d = 3, 49, 5
    x = torch.randn(n, length, d)
    kept, mask, ids_restore = random_masking(x, ratio)
    len_keep = int(length * (1 - ratio))
    assert kept.shape == (n, len_keep, d)
    assert torch.all(mask.sum(1) == length - len_keep)
    # kept tokens are exactly the unmasked ones, in shuffle order; restoring puts them back
    padded = torch.cat([kept, torch.zeros(n, length - len_keep, d)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    keep = mask == 0
    assert torch.equal(restored[keep], x[keep])
    assert torch.all(restored[~keep] == 0)


def test_masking_follows_noise():
    x = torch.arange(8.0).view(1, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]])
    kept, mask, _ = random_masking(x, 0.5, noise)
    assert kept.flatten().tolist() == [1.0, 3.0, 5.0, 7.0]
    assert mask.tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]


@pytest.mark.parametrize("p,size", [(4, 16), (16, 224), (14, 224)])
def test_patchify_unpatchify_round_trip(p, size):
    imgs = torch.randn(2, 3, size, size)
    x = patchify(imgs, p)
    assert x.shape == (2, (size // p) ** 2, p * p * 3)
    assert torch.equal(unpatchify(x, p), imgs)
    # patch 0 is the top-left p x p block, channels last
    assert torch.equal(x[0, 0], imgs[0, :, :p, :p].permute(1, 2, 0).reshape(-1))


def test_loss_counts_masked_patches_only():
    target = torch.zeros(2, 4, 3)
    pred = torch.zeros(2, 4, 3)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred[mask == 0] = 100.0  # errors on visible patches must not count
    pred[0, 0] = 1.0  # squared error 1 on one masked patch
    assert masked_patch_loss(target, pred, mask, norm_pix=False).item() == pytest.approx(1 / 3)


def test_norm_pix_loss_uses_unbiased_per_patch_variance():
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mask = torch.ones(1, 1)
    mean, var = target.mean(), target.var(unbiased=True)
    perfect = (target - mean) / (var + 1e-6) ** 0.5
    assert masked_patch_loss(target, perfect, mask, norm_pix=True).item() == pytest.approx(0, abs=1e-12)
    assert masked_patch_loss(target, torch.zeros_like(target), mask, norm_pix=True).item() == pytest.approx(
        (perfect**2).mean().item())


def test_every_trainable_parameter_gets_a_gradient():
    model = create_model("mae_vit_tiny_patch4", norm_pix_loss=True)
    loss, _, _ = model(torch.randn(2, 3, 16, 16))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
