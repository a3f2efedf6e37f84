"""The MAE presets by name: each one's constructor arguments (`mae.model.MaskedAutoencoderViT`).

Plain data, apart from the model's code: a config is checked against these names where the
model is never built (the driver), without importing timm and torchvision, which cost each
driver process over a second of CPU."""

_PRESETS: dict[str, dict] = {}


def register_preset(name: str, **arch) -> None:
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = arch


def list_models() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str) -> dict:
    """The constructor arguments of a registered preset."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    return dict(_PRESETS[name])


_DEC512D8B = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4)

# The paper's models (decoder: 512-d, 8 blocks, 16 heads).
register_preset("mae_vit_base_patch16", patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC512D8B)
register_preset("mae_vit_large_patch16", patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC512D8B)
register_preset("mae_vit_huge_patch14", patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC512D8B)

# Small models for the demo (32 px digits) and for tests/debugging (seconds per epoch on CPU).
register_preset("mae_vit_demo_patch4", img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4)
register_preset("mae_vit_tiny_patch4", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2)
