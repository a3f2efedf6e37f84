"""Fine-tuning and linear probing on a training worker: the classifier, its optimizer, the
objective of one micro-batch (random erasing, Mixup / CutMix, the loss: timm's own) and the
evaluation of an epoch on the validation stream.

The decoders have made each image's crop, flip and RandAugment (mae/transforms.py); what
acts on the normalised batch runs here, on the device, as the official code runs it after
`ToTensor` + `Normalize` (random erasing) and in its train loop (Mixup).
"""
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mae.classifier import create_classifier, load_pretrained
from mae.recipe import LARS, param_groups_lrd
from mae.transforms import normalize_on_device
from pipelines.common.config import Config

logger = logging.getLogger("mae.train")


def build_classifier(cfg: Config, num_classes: int) -> nn.Module:
    m = cfg.model
    return create_classifier(m.name, m.input_size, num_classes, cfg.train.task, m.drop_path, m.global_pool)


def build_classifier_optimizer(model: nn.Module, cfg: Config, lr: float, fused: bool | None) -> torch.optim.Optimizer:
    """Fine-tuning: AdamW (torch's default betas, as `main_finetune.py`) over the layer-decay
    groups. Linear probing: LARS over the head (`main_linprobe.py`)."""
    o = cfg.optim
    if cfg.train.task == "linprobe":
        return LARS(model.head.parameters(), lr=lr, weight_decay=o.weight_decay)
    groups = param_groups_lrd(model, o.weight_decay, set(model.no_weight_decay()), o.layer_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def init_from_pretrained(model: nn.Module, ckpt: dict, task: str) -> list[str]:
    """The classifier's encoder from a pretrained MAE checkpoint dict (ours or official)."""
    from mae.checkpoint import model_state
    return load_pretrained(model, model_state(ckpt), task)


class Objective:
    """The loss of one normalised micro-batch: timm's random erasing (per-pixel noise, one
    box, probability `augment.reprob` per image), then timm's Mixup / CutMix (one of the two
    per batch, switch probability 0.5) with label smoothing folded into the soft targets,
    and the matching timm loss (soft-target, label-smoothing or plain cross-entropy)."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device):
        a = cfg.augment
        self.erase = RandomErasing(a.reprob, mode="pixel", max_count=1, num_splits=0, device=device) \
            if a.reprob > 0 else None
        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.smoothing,
                           num_classes=num_classes) if a.mixup > 0 or a.cutmix > 0 else None
        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()
        elif a.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(a.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) as the model sees them: erased, mixed; targets are class
        indices, or soft [N, classes] rows summing to 1 with Mixup / CutMix."""
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, targets = self.inputs(images, labels)
        return self.criterion(model(images), targets)


@dataclass
class Accuracy:
    """Counts of one evaluation, summed over the workers."""
    images: int = 0
    top1: int = 0
    top5: int = 0
    loss: float = 0.0

    def metrics(self) -> dict:
        n = max(self.images, 1)
        return {"val_top1": 100.0 * self.top1 / n, "val_top5": 100.0 * self.top5 / n, "val_loss": self.loss / n,
                "val_images": self.images}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], device: torch.device, amp_dtype: torch.dtype | None,
             world: int) -> Accuracy:
    """Top-1 / top-5 and cross-entropy of this worker's share of the validation stream (its
    evaluation view: resize + centre crop), summed over the `world` workers. Rows the
    stream flagged `skipped` (stand-ins for undecodable images) are not counted."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in batches:
        keep = batch["skipped"] == 0
        images = normalize_on_device(batch["image"][keep], device)
        labels = batch["label"][keep].to(device)
        if not len(labels):
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        counts += torch.stack([torch.tensor(float(len(labels)), device=device), hits[:, 0].sum().double(),
                               hits.any(dim=1).sum().double(),
                               nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()])
    if world > 1:
        dist.all_reduce(counts)
    images, top1, top5, loss = counts.tolist()
    model.train()
    return Accuracy(int(images), int(top1), int(top5), loss)
