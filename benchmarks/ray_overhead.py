"""Does running the train loop on Ray Train cost anything over a plain PyTorch loop?

    python benchmarks/ray_overhead.py [--model mae_vit_demo_patch4 --input-size 32 --batch 64 --steps 40]

Runs the same small model for the same number of steps on CPU, fed the same already-decoded
uint8 batches held in memory (so decoding is not what is compared):
  (a) a plain single-process loop: normalise, forward, backward, AdamW step, lr per step;
  (b) `pipelines/pretrain.py`'s train loop on Ray Train with one worker, the batches a
      materialised Ray dataset.
Both use the same number of torch threads. Steps/s is measured after start-up: over the
epochs after the first (the first compiles nothing here but warms caches and starts the
Ray Data iterator), from each epoch's wall time. Last line: JSON with `ratio` = (b)/(a).
"""
import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae import create_model  # noqa: E402
from mae.recipe import build_optimizer, lr_at, scaled_lr, set_lr  # noqa: E402
from pipelines.common.config import load_config  # noqa: E402
from pipelines.output.run_files import read_jsonl  # noqa: E402
from pipelines.worker.step import StepConfig, micro_step, optimizer_step  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


def plain_loop(cfg, images: np.ndarray, steps_per_epoch: int, epochs: int) -> list[float]:
    """Epoch wall times of a single-process loop doing what a Ray worker does per step."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, img_size=cfg.model.input_size, norm_pix_loss=cfg.model.norm_pix_loss)
    lr = scaled_lr(cfg.optim.blr, cfg.train.batch_size)
    opt = build_optimizer(model, lr=lr, weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = torch.from_numpy(images)
    b = cfg.train.batch_size
    step = StepConfig(torch.device("cpu"), cfg.model.mask_ratio, accum_iter=1)
    times = []
    for epoch in range(epochs):
        losses = torch.zeros(steps_per_epoch)
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            set_lr(opt, lr_at(epoch + i / steps_per_epoch, lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, epochs))
            losses[i] = micro_step(model, data[i * b:(i + 1) * b], step, scaler)
            optimizer_step(opt, scaler)
        losses.tolist()
        times.append(time.perf_counter() - t0)
    return times


def ray_loop(cfg, images: np.ndarray) -> list[float]:
    """Epoch wall times of the same steps through pipelines/pretrain.py's trainer."""
    import ray
    from pipelines.driver.trainer import build_trainer
    from pipelines.data.lanes import Lanes

    ray.init(address="local",  # a Ray of its own, even beside a running cluster
             num_cpus=max(2, int(cfg.scaling.cpus_per_worker) + 1), include_dashboard=False,
             object_store_memory=512 * 2**20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items([{"image": img, "label": 0, "skipped": 0} for img in images]).materialize()
    held_out = []
    for img in images[:8]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        held_out.append(buf.getvalue())
    build_trainer(cfg, Lanes((dataset, dataset), "ray-overhead"), len(images), held_out).fit()
    ray.shutdown()
    metrics = read_jsonl(cfg.run_storage(), "metrics.jsonl")
    return [m["epoch_seconds"] for m in metrics]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_demo_patch4")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=4, help="the first is start-up and is not counted")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both loops")
    args = ap.parse_args()

    storage = tempfile.mkdtemp(prefix="ray_overhead_")
    cfg = load_config(str(CONFIG), [
        f"model.name={args.model}", f"model.input_size={args.input_size}", f"train.batch_size={args.batch}",
        f"train.epochs={args.epochs}", "optim.warmup_epochs=1", "train.compile=false", "train.log_every_steps=1000000",
        "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}", f"data.path={storage}",
        f"run.storage_path={storage}", "run.name=ray_overhead"])
    images = np.random.default_rng(0).integers(0, 256, (args.steps * args.batch, args.input_size, args.input_size, 3),
                                               dtype=np.uint8)

    torch.set_num_threads(args.threads)
    plain = plain_loop(cfg, images, args.steps, args.epochs)
    on_ray = ray_loop(cfg, images)
    plain_rate = args.steps * (args.epochs - 1) / sum(plain[1:])
    ray_rate = args.steps * (args.epochs - 1) / sum(on_ray[1:])
    print(f"model {args.model} @ {args.input_size}px, batch {args.batch}, {args.steps} steps x {args.epochs} epochs, "
          f"{args.threads} torch thread(s)")
    print(f"(a) plain PyTorch loop:      {plain_rate:7.2f} steps/s  (epoch seconds {[round(t, 2) for t in plain]})")
    print(f"(b) Ray Train, 1 worker:     {ray_rate:7.2f} steps/s  (epoch seconds {[round(t, 2) for t in on_ray]})")
    print(json.dumps({"plain_steps_per_sec": plain_rate, "ray_steps_per_sec": ray_rate,
                      "ratio": ray_rate / plain_rate}))


if __name__ == "__main__":
    main()
