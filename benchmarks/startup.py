"""How many storage requests, how long and how much driver memory before the first step, on S3?

    python benchmarks/startup.py [--scales 2000,8000] [--per-shard 1000] [--latency 0.03]
        [--decoders 512] [--concurrency 16]

On a local S3-compatible server (moto, started here) behind a proxy that counts every
request, for each layout (ImageFolder; WebDataset with our manifest.json, as published with
OpenCLIP's sizes.json, and bare; Parquet with our manifest and as published), at two scales
of tiny JPEGs in ImageNet's shapes (`--per-shard` images per shard or class folder), it runs
what the driver does before training: list and count the images (`open_source`), fetch the
figures' held-out images, and plan the split of the shards for `--decoders` decoders
(`split_plan`: more decoders than a quarter of the shards splits every shard, as ImageNet's
1,024 shards on a cluster of more than 256 decode CPUs). The baseline does the same the way
this code did before: a pass over every tar's headers (a seek, so a request, per member) to
count a tar without a size file and to split any tar.

It prints, per layout: requests per shard (per image for ImageFolder), seconds here, the
driver's Python memory the listing holds per image (tracemalloc, after listing; the peak
while listing, measured at the larger scale, is bounded by the 16 folders or shards in
flight, not by the images), and the extrapolation to ImageNet-1k
(1.28 M images, 1,024 shards or 1,000 class folders) and to 12.8 M images: the requests at
`--latency` seconds each, `--concurrency` in flight (the driver's thread pool), scaled by
images (conservative for the requests made per shard: ImageNet's shards hold 1,251 images,
these `--per-shard`). Counting a bare tar reads it whole, 8 MB per request: with these tiny
images one request per shard, with ImageNet's 140 MB shards 18; that is bytes, not
requests, and not in the extrapolation (see README). Last line:
JSON with every figure and `ratio`, the baseline's extrapolated ImageNet-1k start-up over
ours for WebDataset as published.
"""
import argparse
import io
import json
import os
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint import s3_server  # noqa: E402  (moto in its own process, with the bucket "bench")
from s3_proxy import S3Proxy  # noqa: E402

from pipelines.data.reading import open_source, wds_member  # noqa: E402
from pipelines.data.stream import UNITS_PER_DECODER, split_plan  # noqa: E402

IMAGENET = {"images": 1_281_167, "shards": 1024, "folders": 1000}
LAYOUTS = ("imagefolder", "webdataset+manifest", "webdataset+sizes.json", "webdataset bare",
           "parquet+manifest", "parquet bare")


def tiny_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=50)
        out.append(buf.getvalue())
    return out


def write_layouts(fs: pafs.FileSystem, prefix: str, images: list[bytes], per_shard: int) -> None:
    """Every layout of `images` under `prefix/<layout>/` on `fs`."""
    groups = [range(k, min(k + per_shard, len(images))) for k in range(0, len(images), per_shard)]
    for g, idx in enumerate(groups):  # imagefolder: one class folder per group
        for i in idx:
            with fs.open_output_stream(f"{prefix}/imagefolder/train/n{g:08d}/n{g:08d}_{i}.JPEG") as f:
                f.write(images[i])
    names = [f"train-{g:05d}-of-{len(groups):05d}" for g in range(len(groups))]
    for g, idx in enumerate(groups):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in idx:
                for ext, data in (("jpg", images[i]), ("cls", str(g).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        for layout in ("webdataset+manifest", "webdataset+sizes.json", "webdataset bare"):
            with fs.open_output_stream(f"{prefix}/{layout}/{names[g]}.tar") as f:
                f.write(buf.getvalue())
        table = pa.table({"image": pa.array([{"bytes": images[i], "path": f"{i}.JPEG"} for i in idx]),
                          "label": pa.array([g] * len(idx), pa.int64())})
        for layout in ("parquet+manifest", "parquet bare"):
            with fs.open_output_stream(f"{prefix}/{layout}/{names[g]}.parquet") as f:
                pq.write_table(table, f, row_group_size=100)
    counts = [len(idx) for idx in groups]
    for layout, ext in (("webdataset+manifest", "tar"), ("parquet+manifest", "parquet")):
        manifest = {"num_images": len(images), "num_shards": len(groups),
                    "shards": [{"path": f"{n}.{ext}", "num_images": c} for n, c in zip(names, counts)]}
        with fs.open_output_stream(f"{prefix}/{layout}/manifest.json") as f:
            f.write(json.dumps(manifest).encode())
    with fs.open_output_stream(f"{prefix}/webdataset+sizes.json/sizes.json") as f:
        f.write(json.dumps({f"{n}.tar": c for n, c in zip(names, counts)}).encode())


def header_pass(fs: pafs.FileSystem, shard: str) -> tuple[int, ...]:
    """The baseline's pass over a tar's headers (seeking past each member's data): each
    sample's first header offset, from which it counted and split a tar."""
    offsets, key = [], None
    with fs.open_input_file(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            k, ext = wds_member(member.name)
            if member.isfile() and k != key:
                offsets.append(member.offset)
                key = k
    return tuple(offsets)


def driver_start(fmt: str, uri: str, endpoint: str, decoders: int, baseline: bool):
    """What the driver does before the first step (see the module's doc) but the held-out
    images; returns the source."""
    from concurrent.futures import ThreadPoolExecutor
    if baseline and fmt == "webdataset":
        source = open_source(fmt, uri, endpoint=endpoint)
        store = source.fs
        with ThreadPoolExecutor(16) as pool:  # counted (published shards) and split by their headers
            passes = 2 if "bare" in uri else 1
            for _ in range(passes):
                list(pool.map(lambda s: header_pass(store, s), source.files))
    else:
        source = open_source(fmt, uri, endpoint=endpoint)
        split_plan(source, UNITS_PER_DECODER * decoders)
    return source


def measure(proxy: S3Proxy, fmt: str, uri: str, decoders: int, baseline: bool) -> dict:
    before = len(proxy.log)
    tracemalloc.start()
    t0 = time.perf_counter()
    source = driver_start(fmt, uri, proxy.endpoint, decoders, baseline)
    held, peak = tracemalloc.get_traced_memory()  # the listing, once made; and while it was made
    tracemalloc.stop()
    source.held_out(8)
    seconds = time.perf_counter() - t0
    return {"requests": len(proxy.log) - before, "seconds": seconds, "held_bytes": held, "peak_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="2000,8000", help="images in each of the two runs")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard and per class folder")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds per request to extrapolate with")
    parser.add_argument("--concurrency", type=int, default=16, help="requests the driver keeps in flight")
    parser.add_argument("--decoders", type=int, default=512, help="decode tasks the split is planned for")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto takes any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    scales = [int(x) for x in args.scales.split(",")]
    proc, endpoint = s3_server()
    proxy = S3Proxy(endpoint)
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", force_virtual_addressing=False)
        images = tiny_jpegs(max(scales))
        rows = {}
        for n in scales:
            t0 = time.perf_counter()
            write_layouts(fs, f"bench/n{n}", images[:n], args.per_shard)
            print(f"{n} images written in every layout in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for layout in LAYOUTS:
                fmt = layout.split("+")[0].split(" ")[0]
                for side in ("ours", "baseline"):
                    if side == "baseline" and (fmt != "webdataset" or n != scales[0]):
                        continue  # the other layouts' start-up did not change; the header pass is per member
                    m = measure(proxy, fmt, f"s3://bench/n{n}/{layout}", args.decoders, side == "baseline")
                    print(f"  {n} {layout} {side}: {m['requests']} requests, {m['seconds']:.1f} s", file=sys.stderr)
                    rows[(n, layout, side)] = m
        (n1, n2), images_n = scales, IMAGENET["images"]
        print(f"start-up on S3 (moto), {args.decoders} decoders planned for; a line through the two scales "
              f"({n1}, {n2} images, {args.per_shard} per shard or class folder) extrapolated at "
              f"{args.latency * 1000:.0f} ms per request, {args.concurrency} in flight")
        print(f"{'layout':22} {'side':8} {'req@' + str(n1):>8} {'req@' + str(n2):>8} {'req/shard':>9} "
              f"{'req/image':>9} {'s here':>7} {'ImageNet req':>12} {'ImageNet s':>10} {'12.8M s':>8} "
              f"{'B/image':>7} {'12.8M GiB':>9} {'peak MiB':>8}")
        figures = {}
        for layout in LAYOUTS:
            ours1, ours2 = rows[(n1, layout, "ours")], rows[(n2, layout, "ours")]
            per_image = (ours2["requests"] - ours1["requests"]) / (n2 - n1)
            fixed = ours1["requests"] - per_image * n1
            memory = max(0.0, (ours2["held_bytes"] - ours1["held_bytes"]) / (n2 - n1))  # held, per image
            sides = {"ours": per_image}
            if (n1, layout, "baseline") in rows:  # the header pass's requests, per member: linear from one scale
                sides["baseline"] = per_image + (rows[(n1, layout, "baseline")]["requests"] - ours1["requests"]) / n1
            for side, rate in sides.items():
                imagenet = fixed + rate * images_n
                web = fixed + rate * 12_800_000
                seconds = imagenet * args.latency / args.concurrency
                web_seconds = web * args.latency / args.concurrency
                here = rows[(n1, layout, side)]["seconds"] if side == "baseline" else ours2["seconds"]
                req1 = rows[(n1, layout, side)]["requests"]
                req2 = ours2["requests"] if side == "ours" else float("nan")
                print(f"{layout:22} {side:8} {req1:8.0f} {req2:8.0f} {rate * args.per_shard:9.2f} {rate:9.4f} "
                      f"{here:7.2f} {imagenet:12.0f} {seconds:10.1f} {web_seconds:8.1f} {memory:7.1f} "
                      f"{memory * 12_800_000 / 2**30:9.2f} {ours2['peak_bytes'] / 2**20:8.1f}")
                figures[f"{layout}/{side}"] = {"requests_per_image": rate, "fixed_requests": fixed,
                                               "imagenet_requests": imagenet, "imagenet_seconds": seconds,
                                               "web_scale_seconds": web_seconds,
                                               "web_scale_driver_gib": memory * 12_800_000 / 2**30,
                                               "peak_mib_here": ours2["peak_bytes"] / 2**20}
        ours, base = figures["webdataset bare/ours"], figures["webdataset bare/baseline"]
        print(json.dumps({"figures": figures, "ratio": base["imagenet_seconds"] / ours["imagenet_seconds"]}))
    finally:
        proxy.close()
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
