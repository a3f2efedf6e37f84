"""What is computed: the MAE model, masking, loss, recipe pieces and checkpoints.

Single-device PyTorch; this package never imports ray.
"""
__all__ = ["MaskedAutoencoderViT", "create_model", "list_models", "register_preset"]


def __getattr__(name: str):
    """The model's names, imported on first use: `mae.transforms` (on every decoder) needs
    neither the model nor timm, whose import cost each decoder process a second."""
    if name in ("list_models", "register_preset"):
        from mae import presets
        return getattr(presets, name)
    if name in __all__:
        from mae import model
        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
