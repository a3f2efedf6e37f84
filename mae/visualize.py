"""Reconstruction figures as in the paper: original, masked input, reconstruction, and the
reconstruction with the visible patches pasted back."""
import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from mae.model import MaskedAutoencoderViT
from mae.transforms import IMAGENET_MEAN, IMAGENET_STD

COLUMNS = ("original", "masked", "reconstruction", "+ visible")


def unnormalize_pred(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Predicted patches back in the target's space. With norm_pix_loss each patch is
    un-normalised with the mean and (unbiased) variance of its own target patch."""
    if not norm_pix:
        return pred
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def to_display(imgs: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [N, 3, H, W] -> [N, H, W, 3] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """imgs: ImageNet-normalised [N, 3, H, W]. Returns [N, 4, H, W, 3] in [0, 1]: the columns
    of `COLUMNS`. Runs the model's parts eagerly, in fp32."""
    imgs = imgs.float()
    latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)
    pred = model.forward_decoder(latent, ids_restore)  # [N, L, p*p*3]
    pred = unnormalize_pred(pred.float(), model.patchify(imgs), model.norm_pix_loss)
    recon = model.unpatchify(pred)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 = removed
    masked = imgs * (1 - pixel_mask)
    pasted = imgs * (1 - pixel_mask) + recon * pixel_mask
    return torch.stack([to_display(x) for x in (imgs, masked, recon, pasted)], dim=1)


def grid_png(panels: torch.Tensor, cell: int = 96, title: str | None = None) -> bytes:
    """[N, C, H, W, 3] in [0, 1] -> PNG bytes: one row per image, one column per panel,
    each cell scaled to `cell` px, column names on top."""
    n, c = panels.shape[:2]
    header, pad = 14 + (14 if title else 0), 2
    canvas = Image.new("RGB", (c * (cell + pad) + pad, header + n * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 1), title, fill="black")
    for j, name in enumerate(COLUMNS[:c]):
        draw.text((pad + j * (cell + pad), header - 13), name, fill="black")
    arr = (panels.cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        for j in range(c):
            tile = Image.fromarray(arr[i, j]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell + pad), header + pad + i * (cell + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
