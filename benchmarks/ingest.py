"""Does our Ray Data stream feed more images per second than a plain PyTorch DataLoader?

    python benchmarks/ingest.py --data DIR [--format imagefolder|webdataset|parquet]
        [--baseline-data IMAGEFOLDER] [--seconds 20] [--cpus N] [--s3-endpoint URL] [--epochs N]
        [--recipe pretrain|finetune] [--address RAY_ADDRESS] [--elastic]

On the same machine, the same number of CPUs and in one process, it measures:
  (a) the baseline: `torch.utils.data.DataLoader` (num_workers = CPUs, shuffled, batch 64)
      over torchvision's `ImageFolder` of `--baseline-data` (default `--data`) with the
      official PIL transforms of `--recipe`. pretrain: RandomResizedCrop(224, scale=(0.2,
      1.0), bicubic), flip, ToTensor, Normalize. finetune: timm's `create_transform` as
      `main_finetune.py` builds it (RandomResizedCrop (0.08, 1), flip, RandAugment
      rand-m9-mstd0.5-inc1, ToTensor, Normalize, random erasing 0.25), its posterize taking
      0 bits as ours does (`mae.transforms.posterize`: on Pillow 13 timm's raises and ends
      the DataLoader);
  (b) ours: the training stream of pipelines/data/stream.py over `--data` in `--format`,
      consumed as a train worker consumes it: epoch after epoch from `EpochStreams` (the
      next epoch decoding while this one ends), `iter_torch_batches`, then normalisation
      (finetune: the decoders crop, flip and RandAugment; the consumer erases the batch
      with timm's random erasing after normalising it, as the fine-tuning step does).
Each side runs `--seconds` after its first batch (start-up is not counted; epochs are
restarted as training restarts them). Last line: JSON with `baseline_images_per_sec`,
`ours_images_per_sec` and `ratio` = ours / baseline.

With `--epochs N` it also runs our stream over N whole epochs (after one more to warm up)
and reports `epochs_images_per_sec`, the images of those epochs over their wall time,
boundaries included, `steady_images_per_sec`, the rate inside epochs (from each epoch's
first batch to its last), and `epochs_ratio` = the first / the second: what epoch
boundaries cost.

With `--s3-endpoint` our stream reads through a proxy on 127.0.0.1 that counts every request
(tests/s3_proxy.py), and the JSON has `requests_per_image`: the stream's requests (listing,
reads, everything) over the images it gave, counted over the whole epochs (with `--epochs`,
the warm-up one included) or else over the timed run, and `requests` by method.

With `--elastic`, (b) is an elastic run's stream (`scaling.min_workers` set): blocks of exactly
`--batch` rows, so that each step's images are the same at any worker count (ImageFolder's
read units cut at multiples of it; shards re-cut by one more Ray Data operator).

Our stream runs on a Ray of its own with `--cpus` CPUs, or with `--address` on a running
cluster (its CPUs: give `--cpus` as many, for the baseline's workers).
"""
import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # s3_proxy

from mae.transforms import (IMAGENET_MEAN, IMAGENET_STD, PRETRAIN, REGION_DECODE, Augment,  # noqa: E402
                            normalize_on_device, with_zero_bit_posterize)
from pipelines.common.config import DataConfig  # noqa: E402
from pipelines.data.skips import skip_counter  # noqa: E402
from pipelines.data.lanes import DTYPES, EpochStreams  # noqa: E402
from pipelines.data.stream import training_stream  # noqa: E402


def timed(batches, seconds: float) -> float:
    """Images/s over `seconds` of `batches()` (a fresh epoch iterator per call), after the first batch."""
    images, t0 = 0, None
    while True:
        seen, epoch = 0, batches()
        try:
            for seen, batch in enumerate(epoch, start=1):
                if t0 is None:
                    t0 = time.perf_counter()
                    continue
                images += len(batch)
                if time.perf_counter() - t0 >= seconds:
                    return images / (time.perf_counter() - t0)
        finally:
            epoch.close()  # stops the iterator's prefetching before its runtime goes away
        if not seen:
            raise SystemExit("error: an epoch gave no batch: fewer images than --batch")


def whole_epochs(batches, epochs: int) -> tuple[float, float]:
    """(images/s over `epochs` whole epochs of `batches()`, boundaries included; images/s
    inside them, from each epoch's first batch to its last), after one epoch to warm up."""
    for _ in batches():
        pass
    images, inside, inside_seconds, t0 = 0, 0, 0.0, time.perf_counter()
    for _ in range(epochs):
        first = last = None
        for batch in batches():
            last = time.perf_counter()
            if first is None:
                first = last
            else:
                inside += len(batch)
            images += len(batch)
        if first is not None:
            inside_seconds += last - first
    return images / (time.perf_counter() - t0), inside / max(inside_seconds, 1e-9)


RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # the paper's fine-tuning policy


def official_transform(recipe: str, size: int):
    """The official code's training transform of `recipe` (per image, PIL in, tensor out)."""
    from torchvision import transforms
    if recipe == "pretrain":
        return transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    tf = create_transform(size, is_training=True, color_jitter=None, auto_augment=RAND_AUGMENT,
                          interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)
    for t in tf.transforms:
        if isinstance(t, RandAugment):
            with_zero_bit_posterize(t)
    return tf


def baseline(root: str, cpus: int, seconds: float, batch: int, size: int, recipe: str = "pretrain") -> float:
    from torchvision import datasets

    tf = official_transform(recipe, size)
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(root, "train"), transform=tf),
                                         batch_size=batch, shuffle=True, num_workers=cpus, drop_last=True,
                                         persistent_workers=True)
    return timed(lambda: (images for images, _ in loader), seconds)


def ours(data: str, fmt: str, cpus: int, seconds: float, batch: int, size: int, endpoint: str | None,
         epochs: int = 0, recipe: str = "pretrain", address: str | None = None,
         elastic: bool = False) -> tuple[float, tuple[float, float] | None, dict | None]:
    """(images/s, whole epochs' figures or None, requests per image and by method or None)."""
    import collections

    import ray
    from timm.data.random_erasing import RandomErasing
    from s3_proxy import S3Proxy
    proxy = S3Proxy(endpoint) if endpoint else None

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=cpus,  # a Ray of its own, even beside a running cluster
                 include_dashboard=False, log_to_driver=False,
                 object_store_memory=min(2 * 2**30, 300 * 2**20 * cpus))
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        augment = PRETRAIN if recipe == "pretrain" else Augment((0.08, 1.0), RAND_AUGMENT)
        erase = RandomErasing(0.25, mode="pixel", max_count=1, num_splits=0, device="cpu") \
            if recipe == "finetune" else None
        d = DataConfig(path=data, format=fmt, s3_endpoint=proxy.endpoint if proxy else None)
        lanes = training_stream(d.open(), d, size, seed=0, augment=augment, batch_size=batch if elastic else None)
        streams = EpochStreams(lanes.datasets, lanes.key, skip_counter(), plans=True, batch_size=batch,
                               drop_last=True, prefetch_batches=4,
                               dtypes=DTYPES)
        device, epochs_started = torch.device("cpu"), itertools.count()
        buffer = None  # the train loop reuses its input tensor on the CPU, as here
        given = [0]  # images the stream gave

        def epoch():  # the next epoch, as the train loop reads it: the one after it starts ahead
            nonlocal buffer
            e = next(epochs_started)
            for b in streams.epoch(e, 0, e + 1):
                given[0] += len(b["image"])
                buffer = normalize_on_device(b["image"], device, out=buffer)
                yield buffer if erase is None else erase(buffer)

        def requests_since(start: tuple[int, int]) -> dict | None:
            if proxy is None:
                return None
            log, images = proxy.log[start[0]:], given[0] - start[1]
            return {"requests_per_image": len(log) / max(images, 1), "images": images,
                    "requests": dict(collections.Counter(method for method, _, _ in log))}
        try:
            rate = timed(epoch, seconds)
            if not epochs:
                return rate, None, requests_since((0, 0))
            start = (len(proxy.log) if proxy else 0, given[0])
            return rate, whole_epochs(epoch, epochs), requests_since(start)
        finally:
            streams.close()
    finally:
        import gc
        gc.collect()  # the closed iterators' prefetch threads end before the runtime does
        time.sleep(1)
        ray.shutdown()
        if proxy is not None:
            proxy.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="what our stream reads (local path or s3://)")
    ap.add_argument("--format", default="imagefolder", choices=["imagefolder", "webdataset", "parquet"])
    ap.add_argument("--baseline-data", help="the ImageFolder root the DataLoader reads (default: --data)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store holding --data")
    ap.add_argument("--epochs", type=int, default=0, help="also time this many whole epochs of our stream")
    ap.add_argument("--recipe", choices=["pretrain", "finetune"], default="pretrain",
                    help="the training view both sides make: pretraining's crop + flip, or fine-tuning's with "
                         "RandAugment and random erasing")
    ap.add_argument("--address", help="run our stream on this running Ray cluster (default: a Ray of its own)")
    ap.add_argument("--elastic", action="store_true",
                    help="our stream as an elastic run's: blocks of exactly --batch rows (each step's images at any "
                         "worker count)")
    args = ap.parse_args()
    base_root = args.baseline_data or args.data
    if args.format != "imagefolder" and not args.baseline_data:
        ap.error("--baseline-data: the DataLoader reads an ImageFolder; name the one the shards came from")
    torch.set_num_threads(1)  # the consumer's normalisation; the decoders run in their own processes

    base = baseline(base_root, args.cpus, args.seconds, args.batch, args.input_size, args.recipe)
    print(f"(a) DataLoader, {args.cpus} workers, {args.recipe} PIL transforms ({base_root}): {base:8.1f} images/s")
    mine, epochs, requests = ours(args.data, args.format, args.cpus, args.seconds, args.batch, args.input_size,
                                  args.s3_endpoint, args.epochs, args.recipe, args.address, args.elastic)
    print(f"(b) Ray Data stream, {args.cpus} CPUs ({args.format}, {args.data}):     {mine:8.1f} images/s"
          f" ({'crop-region' if REGION_DECODE else 'whole-image'} JPEG decoding)")
    result = {"recipe": args.recipe, "elastic": args.elastic, "baseline_images_per_sec": base,
              "ours_images_per_sec": mine, "ratio": mine / base}
    if epochs:
        whole, steady = epochs
        print(f"(c) {args.epochs} whole epochs of (b): {whole:8.1f} images/s, boundaries included; "
              f"{steady:8.1f} inside epochs")
        result.update(epochs_images_per_sec=whole, steady_images_per_sec=steady, epochs_ratio=whole / steady)
    if requests:
        print(f"(d) requests to {args.s3_endpoint}: {requests['requests']} for {requests['images']} images: "
              f"{requests['requests_per_image']:.4f} per image")
        result.update(requests)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
