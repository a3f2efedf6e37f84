"""Masked Autoencoder with a ViT backbone (He et al., 2021).

Key-for-key compatible with the official `models_mae.py`: the released
`mae_pretrain_vit_*` / `mae_visualize_vit_*` checkpoints load with `strict=True`, and our
state dicts load into the official code. Built on timm 1.x `Block` and `PatchEmbed`.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mae.presets import list_models, preset, register_preset  # noqa: F401 (this module's names too)

# --------------------------------------------------------------------------------------
# Pure functions: position embedding, patchify, masking, loss
# --------------------------------------------------------------------------------------


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding, computed in float64 as the reference does.

    Returns [grid_size**2 (+1), embed_dim]; the cls position (first row) is zero.
    """
    assert embed_dim % 4 == 0, "embed_dim must be divisible by 4 for 2D sin-cos embedding"
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # w goes first, as numpy
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega  # [D/4]

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # [M, D/4]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, D/2]

    emb = torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1)  # [M, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, L, p*p*3] with L = (H/p) * (W/p)."""
    n, c, h, w = imgs.shape
    assert h == w and h % p == 0, f"image {h}x{w} is not square or not divisible by patch {p}"
    g = h // p
    x = imgs.reshape(n, c, g, p, g, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, g * g, p * p * c)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """[N, L, p*p*3] -> [N, 3, H, W]."""
    n, length, _ = x.shape
    g = int(length**0.5)
    assert g * g == length, f"{length} patches do not form a square grid"
    x = x.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of noise; small noise is kept.

    x: [N, L, D]. noise: [N, L] or None (then `torch.rand(N, L)`, as the reference).
    Returns (x_kept [N, len_keep, D], mask [N, L] with 1 = removed, ids_restore [N, L]).
    """
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))

    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_kept, mask, ids_restore


def masked_patch_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                      norm_pix: bool) -> torch.Tensor:
    """Mean squared error over the removed patches only.

    target, pred: [N, L, p*p*3]; mask: [N, L], 1 = removed. With `norm_pix` each target
    patch is normalised by its own mean and unbiased variance (eps 1e-6).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(
            sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid).float().unsqueeze(0))

        # patch projection initialised like nn.Linear (not nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # [N, L_keep, D]

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [N, 1 + L_keep, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)  # [N, 1 + L_keep, D_dec]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, D_dec], no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1 + L, D_dec]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1 + L, p*p*3]
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        return masked_patch_loss(self.patchify(imgs), pred, mask, self.norm_pix_loss)

    def forward(self, imgs, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*3]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# --------------------------------------------------------------------------------------
# Presets (registered in mae/presets.py)
# --------------------------------------------------------------------------------------

def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """Build a registered preset; `overrides` replace its constructor arguments."""
    return MaskedAutoencoderViT(**{**preset(name), **overrides})
