"""Images/s and model-FLOPs utilisation of the MAE training step: the reference's step vs ours.

    python benchmarks/train_step.py --model mae_vit_large_patch16 --device cuda [--batch 64]

Same model, same initial weights, same images, in one process:
  (a) reference-style step, as the official `engine_pretrain.py`: images normalised to float
      on the host and copied, fp16 autocast with a gradient scaler (fp32 on CPU, where fp16
      autocast is not what the reference ran), eager model, default AdamW;
  (b) ours (`pipelines.worker.loop.micro_step` + `optimizer_step`): uint8 copied (pinned,
      non-blocking) and normalised on the device, bf16 autocast where supported (fp16 + scaler
      otherwise; fp32 on CPU unless --precision), torch.compile, fused AdamW on CUDA.
Timed over --steps steps after --warmup steps (compilation included in the warm-up).
Prints images/s for both, the model FLOPs per image (mae/flops.py) and MFU against the
device's peak dense bf16/fp16 tensor throughput (table below, or --peak-tflops). Last line:
JSON with reference_images_per_sec, ours_images_per_sec, ratio, mfu.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae import create_model  # noqa: E402
from mae.flops import train_flops_per_image  # noqa: E402
from mae.model import preset  # noqa: E402
from mae.recipe import build_optimizer  # noqa: E402
from mae.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipelines.worker.step import AMP_DTYPES, StepConfig, micro_step, optimizer_step  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0,
               "L40S": 362.0, "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():  # ordered so that "H100 PCIe" is tried before "H100"
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after warm-up."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def reference_step(model, opt, scaler, images_u8: torch.Tensor, device, amp_dtype):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def step():
        imgs = ((images_u8.permute(0, 3, 1, 2).float() / 255 - mean) / std).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _, _ = model(imgs, mask_ratio=0.75)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        loss.item()  # the reference reads the loss every step
    return step


def our_step(model, opt, scaler, images_u8: torch.Tensor, device, amp_dtype):
    pinned = images_u8.pin_memory() if device.type == "cuda" else images_u8
    config = StepConfig(device, mask_ratio=0.75, accum_iter=1, amp_dtype=amp_dtype)

    def step():
        micro_step(model, pinned, config, scaler)
        optimizer_step(opt, scaler)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_large_patch16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=None, help="default: the preset's image size")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                    help="ours; default bf16 on CUDA where supported, else fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ours_precision = args.precision or (("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32")
    ref_dtype = torch.float16 if cuda else None
    size = args.input_size or preset(args.model).get("img_size", 224)
    images = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    results = {}
    for variant in ("reference", "ours"):
        torch.manual_seed(0)
        model = create_model(args.model, img_size=size, norm_pix_loss=True).to(device)
        if variant == "reference":
            opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
            scaler = torch.amp.GradScaler(device.type, enabled=ref_dtype is torch.float16)
            step = reference_step(model, opt, scaler, images, device, ref_dtype)
        else:
            if not args.no_compile:
                model.compile()
            opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, fused=True if cuda else None)
            scaler = torch.amp.GradScaler(device.type, enabled=ours_precision == "fp16")
            step = our_step(model, opt, scaler, images, device, AMP_DTYPES[ours_precision])
        results[variant] = args.batch / timed(step, device, args.warmup, args.steps)
        flops = train_flops_per_image(model)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()

    peak = args.peak_tflops or device_peak(device)
    mfu = results["ours"] * flops / (peak * 1e12) if peak else None
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.model}, batch {args.batch}, {name}")
    print(f"(a) reference step ({'fp16' if ref_dtype else 'fp32'}, eager, host normalise): "
          f"{results['reference']:.1f} images/s")
    print(f"(b) ours ({ours_precision}, {'eager' if args.no_compile else 'compiled'}): {results['ours']:.1f} images/s")
    print(f"model FLOPs per image (train step): {flops / 1e9:.1f} GFLOPs; "
          f"MFU {'n/a (no peak known: --peak-tflops)' if mfu is None else f'{100 * mfu:.1f}% of {peak} TFLOP/s'}")
    print(json.dumps({"reference_images_per_sec": results["reference"], "ours_images_per_sec": results["ours"],
                      "ratio": results["ours"] / results["reference"], "mfu": mfu,
                      "gflops_per_image": flops / 1e9, "device": name}))


if __name__ == "__main__":
    main()
