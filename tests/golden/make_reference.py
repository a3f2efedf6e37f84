"""Regenerate the golden values the model tests compare against, from the official code.

    git clone https://github.com/facebookresearch/mae /tmp/mae_official
    python tests/golden/make_reference.py --official /tmp/mae_official

Runs the official `models_mae.py` on timm 1.x (its `qk_scale=None` argument is dropped and
numpy's removed `np.float` alias restored, nothing else) and writes:
- `mae_reference.pt`: a small official model's weights, inputs, noise and outputs
  (loss, pred, mask) with and without norm_pix_loss;
- `official_keys.json`: every state-dict key and shape of the three paper presets.
"""
import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import timm.models.vision_transformer as tvit
import torch

HERE = Path(__file__).parent


def load_official(repo: Path):
    np.float = np.float64  # removed from numpy >= 1.24; used by util/pos_embed.py
    sys.path.insert(0, str(repo))
    import models_mae

    def block(*args, qk_scale=None, **kwargs):  # timm 0.3.2 argument, gone in timm 1.x
        return tvit.Block(*args, **kwargs)

    models_mae.Block = block
    return models_mae


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/mae")
    args = ap.parse_args()
    models_mae = load_official(args.official)

    keys = {}
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
        with torch.device("meta"):
            m = getattr(models_mae, name)()
        keys[name] = {k: list(v.shape) for k, v in m.state_dict().items()}
    (HERE / "official_keys.json").write_text(json.dumps(keys))

    arch = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    torch.manual_seed(0)
    golden = {"arch": {k: v for k, v in arch.items() if k != "norm_layer"}, "cases": []}
    model = models_mae.MaskedAutoencoderViT(**arch).eval()
    golden["init_pos_embed"] = model.pos_embed.detach().clone()
    golden["init_decoder_pos_embed"] = model.decoder_pos_embed.detach().clone()
    # perturb every weight so the comparison does not rest on zero biases / unit norms
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    golden["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
    imgs = torch.randn(4, 3, 32, 32)
    for norm_pix in (False, True):
        for mask_ratio in (0.75, 0.5):
            model.norm_pix_loss = norm_pix
            seed = 1234 + len(golden["cases"])
            torch.manual_seed(seed)
            noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches)
            torch.manual_seed(seed)  # the official forward draws exactly this noise
            with torch.no_grad():
                loss, pred, mask = model(imgs, mask_ratio=mask_ratio)
            golden["cases"].append(dict(norm_pix_loss=norm_pix, mask_ratio=mask_ratio, seed=seed,
                                        noise=noise, loss=loss, pred=pred, mask=mask))
    golden["imgs"] = imgs
    torch.save(golden, HERE / "mae_reference.pt")
    print(f"wrote {HERE / 'mae_reference.pt'} and {HERE / 'official_keys.json'}")


if __name__ == "__main__":
    main()
