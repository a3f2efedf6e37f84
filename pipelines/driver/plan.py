"""What a config will do, on one screen, before any accelerator is committed (`--plan` of
pretrain.py, finetune.py and linprobe.py): nothing is trained and no cluster is needed.

The schedule comes from the config and the image count (listed from `data.path` when it is
readable here, else ImageNet-1k's); the model's size and FLOPs from its preset (the MAE, or
the classifier on its encoder); the input rate from a stated images/s per accelerator; the
decode CPUs it needs from the decode rate measured here, on one CPU, with the config's
training view (RandAugment included), on images of the data (or on two real photographs
that ship with scikit-learn when the data is not readable here).
"""
import math
import os
import textwrap
import time

import numpy as np
import torch

from mae.transforms import PRETRAIN, Augment, decodable, decode_crop_batch
from pipelines.common.config import Config
from pipelines.common.schedule import Schedule
from pipelines.worker.tasks import task_of

IMAGENET_1K_TRAIN = 1_281_167


def sample_images(source, n: int = 32) -> tuple[list[bytes], str]:
    """Encoded images to time decoding on: `n` of the source's, else scikit-learn's photos."""
    if source is not None:
        blobs = decodable(source.held_out(n), n)
        if blobs:
            return blobs, f"{len(blobs)} images of data.path"
    import importlib.util  # the package's folder, without importing scikit-learn (1.5 s of CPU)
    folder = os.path.join(importlib.util.find_spec("sklearn").submodule_search_locations[0], "datasets", "images")
    blobs = [open(os.path.join(folder, name), "rb").read() for name in ("china.jpg", "flower.jpg")]
    return blobs * (n // 2), "2 photographs (640x427 JPEG) shipped with scikit-learn"


def decode_rate(blobs: list[bytes], size: int, seconds: float = 1.0, augment: Augment = PRETRAIN) -> float:
    """Images/s that one CPU decodes + crops + flips (+ RandAugment: `augment`), the
    stream's work per image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        decode_crop_batch(blobs[:2], size, rng, augment)  # warm up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _, ok, _ = decode_crop_batch(blobs, size, rng, augment)
            done += len(ok)
        return done / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def compact(cfg: Config, width: int = 110) -> list[str]:
    """The resolved config as `section: key=value ...` lines (the config holds no credentials)."""
    out = []
    for section, values in cfg.to_dict().items():
        text = " ".join(f"{k}={v}" for k, v in values.items())
        out += textwrap.wrap(text, width, initial_indent=f"  {section + ':':<8} ", subsequent_indent=" " * 11)
    return out


def plan(cfg: Config, num_images: int | None, images_note: str, blobs: list[bytes], blobs_note: str,
         accelerator_rate: float) -> str:
    """The plan as text (about one screen)."""
    m, o, t, s = cfg.model, cfg.optim, cfg.train, cfg.scaling
    n = num_images or IMAGENET_1K_TRAIN
    effective, task = cfg.effective_batch, task_of(cfg)
    sched = Schedule.of(cfg, n, s.num_workers)
    lr, accum, steps = sched.peak_lr, sched.accum_iter, sched.steps_per_epoch
    with torch.device("meta"):
        model = task.model(cfg, m.num_classes or 1000)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = task.train_flops(model, cfg)
    moments = "AdamW moments" if task.optimizer_moments == 2 else "LARS momentum"
    checkpoint = 4 * (params + task.optimizer_moments * trainable)  # fp32 weights + the optimizer's
    feed = accelerator_rate * s.num_workers
    per_cpu = decode_rate(blobs, m.input_size, augment=cfg.augment.view)
    accelerator = cfg.accelerator
    resources = accelerator.worker_resources(s.cpus_per_worker)
    lines = ["resolved config:", *compact(cfg), "",
        f"data:           {n:,} images ({images_note})",
        f"batch:          {t.batch_size} per worker x accum {accum} x {s.num_workers} workers "
        f"= effective {effective:,}" + ("" if s.min_workers is None else
                                         f" (the same at {s.min_workers}..{s.num_workers} workers: accum " +
                                         ", ".join(str(cfg.accum_iter(w)) for w in cfg.worker_counts) + ")"),
        f"lr:             {lr:.3g} (blr {o.blr:g} x {effective:,} / 256)" if not o.lr else f"lr:             {lr:.3g}",
        f"schedule:       {steps:,} steps per epoch x {t.epochs} epochs = {sched.total_steps:,} steps; "
        f"warmup {o.warmup_epochs:g} epochs = {sched.warmup_steps:,} steps, then cosine to {o.min_lr:g}",
        f"per worker:     {resources} ({accelerator.name}, {t.precision})",
        f"model:          {m.name} at {m.input_size}px: {params / 1e6:,.1f} M parameters "
        f"({trainable / 1e6:,.1f} M trained), {flops / 1e9:,.1f} GFLOPs per image per training step",
        f"checkpoint:     about {checkpoint / 2**30:,.2f} GiB (fp32 weights + {moments})",
        f"input:          {accelerator_rate:,.0f} images/s per accelerator (--accelerator-rate) x "
        f"{s.num_workers} = {feed:,.0f} images/s, {feed * flops / 1e12:,.1f} TFLOP/s of model compute",
        f"decoding:       {per_cpu:,.0f} images/s per CPU measured here on {blobs_note}: "
        f"{math.ceil(feed / per_cpu):,} decode CPUs to keep up",
        f"one epoch:      {n / feed / 60:,.1f} min at that rate; the run: {n * t.epochs / feed / 3600:,.1f} h",
    ]
    return "\n".join(lines)
