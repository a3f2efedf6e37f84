"""Convert an ImageFolder (`<src>/train/<class>/<image>`) into Parquet or WebDataset shards.

    python pipelines/prepare_shards.py --src /datasets/imagenet --dst s3://bucket/imagenet-wds \\
        --format webdataset [--max-side 384] [--shard-size 512MB] [--s3-endpoint URL]
    python pipelines/prepare_shards.py --src /datasets/imagenet --dst s3://bucket/imagenet-wds-val \\
        --format webdataset --split val     (validation shards: fine-tuning's data.val_path)

Labels are the indices of the sorted class folders (as torchvision's ImageFolder gives
them); `<dst>/classes.json` lists the class names and `<dst>/manifest.json` the shards with
their image counts, so training knows its epoch size without reading the shards. Images
are spread over the shards in a fixed pseudo-random order (every shard holds a mix of
classes). With `--max-side`, images larger than that are resized (bicubic) and re-encoded
as JPEG at `--quality`; images that do not decode are then left out and listed in the
manifest. Without it the original bytes are stored untouched.

The conversion runs on Ray Data, one task per shard, so a cluster converts in parallel;
Ray Data shows the progress. Each shard is written atomically, so a second run with the
same arguments skips the shards already there and never duplicates or corrupts one; a
run with other arguments into a folder that holds shards is refused.
"""
import argparse
import io
import json
import re
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402

from cluster.storage import open_storage  # noqa: E402
from pipelines.data.reading import (CLASSES, MANIFEST, SHARD_EXTENSIONS, DataError, count_shard,  # noqa: E402
                               list_imagefolder, read_file)

PARAMS = "conversion.json"  # the arguments the shards in a folder were made with, written first
ORDER_SEED = 0


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512MB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def plan_shards(paths: list[str], sizes: list[int], labels: list[int], shard_bytes: int,
                max_side: int | None) -> list[dict]:
    """Fixed pseudo-random order, then consecutive runs of about `shard_bytes` each (with
    re-encoding, input sizes are scaled by the pixel ratio to estimate the output)."""
    order = np.random.default_rng(ORDER_SEED).permutation(len(paths))
    shrink = 1.0 if max_side is None else min(1.0, (max_side / 500) ** 2)  # ImageNet's typical side
    shards, current, total = [], [], 0
    for i in order:
        current.append(int(i))
        total += sizes[i] * shrink
        if total >= shard_bytes:
            shards.append(current)
            current, total = [], 0
    if current:
        shards.append(current)
    return [{"index": k, "paths": [paths[i] for i in idx], "labels": [labels[i] for i in idx]}
            for k, idx in enumerate(shards)]


def shard_name(fmt: str, index: int, count: int) -> str:
    return f"train-{index:05d}-of-{count:05d}{SHARD_EXTENSIONS[fmt]}"


def reencode(data: bytes, max_side: int, quality: int) -> tuple[bytes, str]:
    """(bytes, extension): resized to `max_side` and JPEG-encoded when larger, else as is."""
    from PIL import Image

    from mae.transforms import decode_rgb
    img = decode_rgb(data)  # raises ValueError for what is not an image
    h, w = img.shape[-2:]
    if max(h, w) <= max_side and data[:3] == b"\xff\xd8\xff":
        return data, "jpg"
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def extension_of(data: bytes, path: str) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return path.rsplit(".", 1)[-1].lower()


class WriteShard:
    """One Ray task per shard: read its images, (re-encode,) write it atomically."""

    def __init__(self, args: dict, num_shards: int):
        self.args, self.num_shards = args, num_shards

    def __call__(self, spec: dict) -> dict:
        a = self.args
        src_fs = open_storage(a["src"], a["s3_endpoint"]).fs
        dst = open_storage(a["dst"], a["s3_endpoint"])
        name = shard_name(a["format"], spec["index"], self.num_shards)
        if dst.fs.get_file_info(dst.path(name)).type == pafs.FileType.File:  # written whole by an earlier run
            return {"path": name, "num_images": count_shard(dst.fs, dst.path(name), a["format"]), "skipped": [],
                    "existed": True}
        samples, skipped = [], []
        for path, label in zip(spec["paths"], spec["labels"]):
            data = read_file(src_fs, path)
            if a["max_side"]:
                try:
                    data, ext = reencode(data, a["max_side"], a["quality"])
                except ValueError as e:
                    skipped.append(f"{path}: {e}")
                    continue
            else:
                ext = extension_of(data, path)
            samples.append((path, label, data, ext))
        dst.write(name, write_parquet(samples) if a["format"] == "parquet" else write_tar(samples))  # atomic
        return {"path": name, "num_images": len(samples), "skipped": skipped, "existed": False}


def write_parquet(samples: list) -> bytes:
    import pyarrow.parquet as pq
    image = pa.StructArray.from_arrays(
        [pa.array([s[2] for s in samples], pa.binary()), pa.array([s[0].rsplit("/", 1)[-1] for s in samples])],
        names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array([s[1] for s in samples], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=256, compression="none")  # JPEG bytes do not compress
    return buf.getvalue()


def write_tar(samples: list) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, label, data, ext in samples:
            key = re.sub(r"[^A-Za-z0-9_-]", "_", path.rsplit("/", 1)[-1].rsplit(".", 1)[0])
            for member, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def convert(src: str, dst: str, fmt: str, max_side: int | None = None, shard_size: int = 512 * 2**20,
            quality: int = 90, s3_endpoint: str | None = None, split: str = "train") -> dict:
    """Write the shards of `<src>/<split>/`, classes.json and manifest.json; returns the manifest."""
    import ray

    if fmt not in SHARD_EXTENSIONS:
        raise DataError(f"--format: {fmt!r} is not one of {sorted(SHARD_EXTENSIONS)}")
    source = open_storage(src, s3_endpoint)
    folder = list_imagefolder(source.fs, source.root, split)
    paths, labels, classes = list(folder.paths), [int(x) for x in folder.labels], folder.classes
    sizes = [i.size for i in source.fs.get_file_info(paths)]
    params = {"src": src, "format": fmt, "max_side": max_side, "quality": quality if max_side else None,
              "shard_size": shard_size, "num_source_images": len(paths),
              **({"split": split} if split != "train" else {})}  # (shards made before --split record none)
    out = open_storage(dst, s3_endpoint)
    before = json.loads(out.read(PARAMS) or "null")
    if before is not None and before != params:
        raise DataError(f"--dst: {dst} holds shards made with other arguments ({before}); choose a new --dst")
    if before is None:
        out.write(PARAMS, json.dumps(params, indent=1))

    specs = plan_shards(paths, sizes, labels, shard_size, max_side)
    write = WriteShard({"src": src, "dst": dst, "format": fmt, "max_side": max_side, "quality": quality,
                        "s3_endpoint": s3_endpoint}, len(specs))
    results = (ray.data.from_items(specs, override_num_blocks=len(specs))
               .map(write, num_cpus=1).take_all())
    results.sort(key=lambda r: r["path"])
    manifest = {**params, "num_images": sum(r["num_images"] for r in results), "num_shards": len(results),
                "num_classes": len(classes),
                "shards": [{"path": r["path"], "num_images": r["num_images"]} for r in results],
                "skipped": sorted(s for r in results for s in r["skipped"]),
                "reused_shards": sum(r["existed"] for r in results)}
    for name, payload in ((CLASSES, classes), (MANIFEST, manifest)):
        out.write(name, json.dumps(payload, indent=1))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="ImageFolder root holding train/<class>/<image> (path or s3://)")
    ap.add_argument("--dst", required=True, help="folder for the shards (path or s3://)")
    ap.add_argument("--format", required=True, choices=sorted(SHARD_EXTENSIONS))
    ap.add_argument("--max-side", type=int, help="re-encode images larger than this (JPEG)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    ap.add_argument("--shard-size", type=parse_size, default="512MB", help="target shard size, e.g. 512MB")
    ap.add_argument("--s3-endpoint", help="endpoint of the S3-compatible store (src and dst)")
    ap.add_argument("--split", default="train", help="the folder of --src to convert: train (default) or val")
    args = ap.parse_args(argv)
    import ray
    ray.init(ignore_reinit_error=True)
    try:
        manifest = convert(args.src, args.dst, args.format, args.max_side, args.shard_size, args.quality,
                           args.s3_endpoint, args.split)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{manifest['num_images']} images in {manifest['num_shards']} {args.format} shards "
          f"({manifest['reused_shards']} already there) at {args.dst}; {len(manifest['skipped'])} skipped")
    for line in manifest["skipped"]:
        print(f"  skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
