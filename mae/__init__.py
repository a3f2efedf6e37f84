"""What is computed: the MAE model, masking, loss, recipe pieces and checkpoints.

Single-device PyTorch; this package never imports ray.
"""
from mae.model import MaskedAutoencoderViT, create_model, list_models, register_preset

__all__ = ["MaskedAutoencoderViT", "create_model", "list_models", "register_preset"]
