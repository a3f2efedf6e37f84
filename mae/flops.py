"""Model FLOPs of a training step, counted from the architecture (matmuls only, multiply-add
= 2 FLOPs; backward = 2x forward): the MAE's, and the classifier's of fine-tuning and linear
probing (mae/classifier.py)."""
from mae.model import MaskedAutoencoderViT


def _block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    dense = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio)  # qkv (3), proj (1), mlp (2 x ratio)
    attention = 4 * tokens * tokens * dim  # q @ k^T and attn @ v
    return dense + attention


def forward_flops_per_image(model: MaskedAutoencoderViT, mask_ratio: float = 0.75) -> float:
    """Encoder on the kept patches (+ cls), decoder on all patches (+ cls)."""
    length = model.patch_embed.num_patches
    kept = int(length * (1 - mask_ratio))
    d = model.pos_embed.shape[-1]
    dd = model.decoder_pos_embed.shape[-1]
    patch_dim = model.patch_size**2 * model.in_chans
    enc_ratio = model.blocks[0].mlp.fc1.out_features / d
    dec_ratio = model.decoder_blocks[0].mlp.fc1.out_features / dd if len(model.decoder_blocks) else 0
    flops = 2 * length * patch_dim * d  # patch embedding (all patches are embedded, then masked)
    flops += len(model.blocks) * _block_flops(kept + 1, d, enc_ratio)
    flops += 2 * (kept + 1) * d * dd  # decoder_embed
    flops += len(model.decoder_blocks) * _block_flops(length + 1, dd, dec_ratio)
    flops += 2 * (length + 1) * dd * patch_dim  # decoder_pred
    return float(flops)


def train_flops_per_image(model: MaskedAutoencoderViT, mask_ratio: float = 0.75) -> float:
    return 3 * forward_flops_per_image(model, mask_ratio)


def classifier_train_flops_per_image(model, task: str) -> float:
    """A timm ViT classifier on every patch (+ cls): fine-tuning trains it all (3x forward);
    a linear probe's backward reaches only its head (about 1x forward)."""
    length = model.patch_embed.num_patches
    d = model.pos_embed.shape[-1]
    patch_dim = model.patch_embed.proj.weight[0].numel()
    ratio = model.blocks[0].mlp.fc1.out_features / d
    head = model.head[-1] if hasattr(model.head, "__getitem__") else model.head
    flops = 2 * length * patch_dim * d + len(model.blocks) * _block_flops(length + 1, d, ratio)
    flops += 2 * head.in_features * head.out_features
    return float(3 * flops if task == "finetune" else flops + 4 * head.in_features * head.out_features)
