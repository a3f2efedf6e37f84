"""What differs between pretraining, fine-tuning and linear probing, in one place: a task
object (the model, its optimizer, the objective of a micro-batch, where its weights start,
how a checkpoint restores it, whether it is evaluated and what it exports). The train loop,
the driver and `--plan` call it and never ask which task they run.

Classification's objective and evaluation are here too. The decoders have made each image's
crop, flip and RandAugment (mae/transforms.py); what acts on the normalised batch runs here,
on the device, as the official code runs it after `ToTensor` + `Normalize` (random erasing)
and in its train loop (Mixup).
"""
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from mae.checkpoint import image_size_of, load_mae_state, model_state, recorded_preset
from mae.export import (
    encoder_state_for_timm,
    save_timm_encoder,
    timm_load_example,
    timm_model_name,
)
from mae.recipe import LARS, build_optimizer, param_groups_lrd
from pipelines.common.config import Config
from pipelines.common.errors import FatalError, one_line

# The model's code (mae.model, mae.classifier, mae.flops on timm; mae.transforms on
# torchvision) is imported in the methods that use it, on the training workers: the driver
# imports this module for a task's name and flags only, and importing timm and torchvision
# cost every run's driver over a second of CPU.

logger = logging.getLogger("mae.train")


class Pretrain:
    """The MAE itself: its own masked-patch loss, AdamW (0.9, 0.95), reconstructions of
    held-out images after each epoch, no evaluation."""
    name, verb = "pretrain", "training"
    entry_point = "pipelines/pretrain.py"
    classifies = False  # no classes, no validation stream
    figures = True  # reconstructions of held-out images each epoch
    optimizer_moments = 2  # AdamW's, per trained weight

    def model(self, cfg: Config, num_classes: int | None = None) -> nn.Module:
        from mae.model import create_model
        m = cfg.model
        return create_model(m.name, img_size=m.input_size, norm_pix_loss=m.norm_pix_loss)

    def optimizer(self, model: nn.Module, cfg: Config, lr: float, fused: bool | None) -> torch.optim.Optimizer:
        return build_optimizer(model, lr=lr, weight_decay=cfg.optim.weight_decay, fused=fused)

    def objective(self, cfg: Config, num_classes: int | None, device: torch.device) -> None:
        """None: the loss is the MAE's own forward (at `model.mask_ratio`)."""
        return None

    def initial_weights(self, model: nn.Module, cfg: Config, read_checkpoint) -> str:
        """Weights of a run with no checkpoint of its own: where they came from."""
        return "fresh weights"

    def load_weights(self, model: nn.Module, ckpt: dict) -> None:
        """A checkpoint of ours or the official code's: full state dicts load strictly,
        encoder-only ones (`mae_pretrain_vit_*.pth`) the encoder, naming the decoder keys."""
        missing = load_mae_state(model, model_state(ckpt))
        if missing:
            logger.info("checkpoint holds the encoder only; newly initialised: %s", ", ".join(missing))

    def train_flops(self, model: nn.Module, cfg: Config) -> float:
        from mae.flops import train_flops_per_image
        return train_flops_per_image(model, cfg.model.mask_ratio)

    def export_timm(self, ckpt: dict, out: str) -> list[str]:
        """Write the encoder of an MAE checkpoint as timm VisionTransformer weights without a
        head (safetensors); the lines saying what, and how to load it."""
        state = model_state(ckpt)
        encoder = encoder_state_for_timm(state)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_timm_encoder(encoder, out)
        img_size = image_size_of(state)
        name = timm_name_or_none(ckpt, img_size)
        return [f"wrote {out}: {len(encoder)} tensors, a timm VisionTransformer encoder at {img_size}px "
                + (f"for timm model {name}" if name else "(the checkpoint records no preset with a timm model)"),
                f"load it with: {timm_load_example(name, out)}"]


class Classify:
    """A classifier on a pretrained MAE's encoder (timm's VisionTransformer), evaluated on the
    validation stream after each epoch. Fine-tuning trains every weight with AdamW (torch's
    default betas, as `main_finetune.py`) over the layer-decay groups; linear probing trains
    the head only with LARS (`main_linprobe.py`)."""
    classifies, figures = True, False

    def __init__(self, name: str, verb: str, entry_point: str):
        self.name, self.verb, self.entry_point = name, verb, entry_point
        self.optimizer_moments = 1 if name == "linprobe" else 2  # LARS momentum / AdamW's two

    def model(self, cfg: Config, num_classes: int | None) -> nn.Module:
        from mae.classifier import create_classifier
        m = cfg.model
        return create_classifier(m.name, m.input_size, num_classes, self.name, m.drop_path, m.global_pool)

    def optimizer(self, model: nn.Module, cfg: Config, lr: float, fused: bool | None) -> torch.optim.Optimizer:
        o = cfg.optim
        if self.name == "linprobe":
            return LARS(model.head.parameters(), lr=lr, weight_decay=o.weight_decay)
        groups = param_groups_lrd(model, o.weight_decay, set(model.no_weight_decay()), o.layer_decay)
        return torch.optim.AdamW(groups, lr=lr, fused=fused)

    def objective(self, cfg: Config, num_classes: int, device: torch.device) -> "Objective":
        return Objective(cfg, num_classes, device)

    def initial_weights(self, model: nn.Module, cfg: Config, read_checkpoint) -> str:
        """The encoder of `model.checkpoint` (read by `read_checkpoint(cfg)`), or random weights."""
        from mae.classifier import load_pretrained
        if not cfg.model.checkpoint:
            return "random weights (no model.checkpoint)"
        fresh = load_pretrained(model, model_state(read_checkpoint(cfg)), self.name)
        return f"the encoder of model.checkpoint={cfg.model.checkpoint} (newly initialised: {', '.join(fresh)})"

    def load_weights(self, model: nn.Module, ckpt: dict) -> None:
        """A classifier checkpoint of ours: the whole of it."""
        try:
            model.load_state_dict(model_state(ckpt))
        except RuntimeError as e:  # a restart would meet it again
            raise FatalError(f"the checkpoint does not fit this classifier (model.name, model.num_classes, "
                             f"train.task): {one_line(e)[:500]}") from None

    def train_flops(self, model: nn.Module, cfg: Config) -> float:
        from mae.flops import classifier_train_flops_per_image
        return classifier_train_flops_per_image(model, self.name)

    def export_timm(self, ckpt: dict, out: str) -> list[str]:
        """Write a classifier checkpoint as timm safetensors (a linear probe's BatchNorm folded
        into its head); the lines saying what, and how to load it."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from mae.classifier import create_classifier, timm_state
        m = ckpt["config"]["model"]
        state = model_state(ckpt)
        num_classes = state["head.1.weight" if self.name == "linprobe" else "head.weight"].shape[0]
        model = create_classifier(m["name"], m["input_size"], num_classes, self.name, global_pool=m["global_pool"])
        model.load_state_dict(state)
        pool = "avg" if self.name == "finetune" and m["global_pool"] else "token"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_timm_encoder(timm_state(model), out)
        name = timm_name_or_none(ckpt, m["input_size"]) or "vit_<size>_patch<p>_<img_size>"
        folded = ", its BatchNorm folded into the head" if self.name == "linprobe" else ""
        return [f"wrote {out}: a timm VisionTransformer classifier ({m['name']} encoder, {num_classes} classes, "
                f"global_pool={pool!r}{folded})",
                f"load it with: timm.create_model(\"{name}\", pretrained=True, num_classes={num_classes}, "
                f"global_pool=\"{pool}\", pretrained_cfg_overlay=dict(file=\"{out}\", num_classes={num_classes}, "
                f"mean={IMAGENET_DEFAULT_MEAN}, std={IMAGENET_DEFAULT_STD}))"]


TASKS = {"pretrain": Pretrain(),
         "finetune": Classify("finetune", "fine-tuning", "pipelines/finetune.py"),
         "linprobe": Classify("linprobe", "linear probing", "pipelines/linprobe.py")}


def task_of(cfg: Config) -> Pretrain | Classify:
    """The task object of `train.task`."""
    return TASKS[cfg.train.task]


def recorded_task(ckpt: dict) -> str:
    """The task a checkpoint of ours records ("pretrain" for an official MAE checkpoint)."""
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    task = config.get("train", {}).get("task", "pretrain")
    return task if task in TASKS else "pretrain"


def timm_name_or_none(ckpt: dict, img_size: int) -> str | None:
    """The timm model of the preset the checkpoint records, if it has one."""
    preset_name = recorded_preset(ckpt)
    try:
        return timm_model_name(preset_name, img_size) if preset_name else None
    except ValueError:
        return None


class Objective:
    """The loss of one normalised micro-batch: timm's random erasing (per-pixel noise, one
    box, probability `augment.reprob` per image), then timm's Mixup / CutMix (one of the two
    per batch, switch probability 0.5) with label smoothing folded into the soft targets,
    and the matching timm loss (soft-target, label-smoothing or plain cross-entropy)."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
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
    from mae.transforms import normalize_on_device
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
