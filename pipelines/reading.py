"""Training images at rest: ImageNet's class folders, WebDataset tar shards or Parquet
shards, on a local/NFS path or an S3-compatible store. Listing, path patterns, counting, and
reading each layout into (encoded bytes, label, name) samples. No Ray here: streaming them
through Ray Data is `pipelines/stream.py`.

`open_source` lists the files and counts the images before anything runs, so the epoch
size (and with it the lr schedule) is right from step 0: from the listing (imagefolder),
from the `manifest.json` that `prepare_shards.py` writes, or else from the shards
themselves (Parquet footers; tar headers).
"""
import fnmatch
import itertools
import json
import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from cluster.storage import Storage, open_storage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SHARD_EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png")
MANIFEST, CLASSES = "manifest.json", "classes.json"


class DataError(ValueError):
    """The data path does not hold what the config says it holds."""


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------


def _list_files(fs: pafs.FileSystem, folder: str, recursive: bool = True) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise DataError(f"data.path: cannot list {folder}: {e}") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def list_images(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Sorted paths of the image files (by extension, `IMAGE_EXTENSIONS`) anywhere under `folder`."""
    return sorted(i.path for i in _list_files(fs, folder) if i.path.lower().endswith(IMAGE_EXTENSIONS))


def class_of(path: str) -> str:
    """The class of an image at `<root>/<split>/<class>/<image>`: its folder's name."""
    return path.rsplit("/", 2)[-2]


@dataclass(frozen=True)
class ImageFolder:
    """The listing of `<root>/<split>/<class>/<image>`; labels index the sorted class names
    (as torchvision's ImageFolder gives them)."""
    root: str
    paths: list[str]  # sorted by class, then name
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_imagefolder(fs: pafs.FileSystem, root: str, split: str = "train") -> ImageFolder:
    """The images of `<root>/<split>/<class>/<image>` (`root` a path inside `fs`)."""
    top = f"{root.rstrip('/')}/{split}"
    if fs.get_file_info(top).type != pafs.FileType.Directory:
        raise DataError(f"data.path: {root!r} has no {split}/ folder (expected {top}/<class>/<image>)")
    paths = [p for p in list_images(fs, top) if p[len(top) + 1:].count("/") == 1]
    if not paths:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {top}/<class>/")
    classes = sorted({class_of(p) for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    return ImageFolder(root, paths, [index[class_of(p)] for p in paths], classes)


def expand_braces(pattern: str) -> list[str]:
    """`a-{0000..0003}.tar` -> a-0000.tar .. a-0003.tar (zero padding kept); `{a,b}` lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def list_shards(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    """Shard files of `path`: a folder (searched recursively), a glob, or a brace pattern."""
    ext = SHARD_EXTENSIONS[fmt]
    if "{" in path:
        shards = expand_braces(path)
        missing = [p for p, i in zip(shards, fs.get_file_info(shards)) if i.type != pafs.FileType.File]
        if missing:
            raise DataError(f"data.path: {len(missing)} of the {len(shards)} shards of the pattern do not exist "
                            f"(first: {missing[0]})")
        return shards
    if any(c in path for c in "*?["):
        folder = path[:path.index(next(c for c in path if c in "*?["))].rsplit("/", 1)[0]
        shards = sorted(i.path for i in _list_files(fs, folder) if fnmatch.fnmatch(i.path, path))
    else:
        shards = sorted(i.path for i in _list_files(fs, path) if i.path.endswith(ext))
    if not shards:
        raise DataError(f"data.path: no {ext} shards at {path} (data.format={fmt})")
    return shards


def evenly_spaced(items, n: int) -> list:
    """At most `n` items spread over the whole sequence (so a sorted listing shows several classes)."""
    items = list(items)
    return [items[i * len(items) // n] for i in range(min(n, len(items)))]


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------


def count_parquet(fs: pafs.FileSystem, shard: str) -> int:
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        return pq.ParquetFile(f).metadata.num_rows


def count_tar(fs: pafs.FileSystem, shard: str) -> int:
    """Samples (image members) of a WebDataset tar, reading only its headers where it can seek."""
    with fs.open_input_file(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return sum(1 for m in tar if m.isfile() and wds_member(m.name)[1] in WDS_IMAGE_KEYS)


def count_shard(fs: pafs.FileSystem, shard: str, fmt: str) -> int:
    return (count_parquet if fmt == "parquet" else count_tar)(fs, shard)


def wds_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a WebDataset tar member: the key is the member's path up
    to the first dot of its basename, as WebDataset groups a sample's files."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return name[:len(name) - len(base)] + key, ext.lower()


# --------------------------------------------------------------------------------------
# A source: listed and counted
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where the images are and how many: listed and counted before training starts."""
    format: str
    uri: str
    fs: pafs.FileSystem
    root: str  # `uri` as a path inside `fs`
    files: tuple[str, ...]  # image files (imagefolder) or shards
    num_images: int
    classes: tuple[str, ...]  # class names (imagefolder, or the shards' classes.json); may be empty
    counts: tuple[int, ...] = ()  # images per shard (webdataset, parquet)
    labels: tuple[int, ...] = ()  # label of each image file (imagefolder)

    def __len__(self) -> int:
        return self.num_images

    def held_out(self, n: int, window: int = 256) -> list[bytes]:
        """Encoded bytes of `n` fixed images for figures: from `val/` of an imagefolder
        when it has one, else evenly spaced over the training images (for shards: over
        the first `window` images of the first shard, so that a 512 MB shard is not read
        on the driver before training starts)."""
        if self.format == "imagefolder":
            try:
                paths = list_imagefolder(self.fs, self.root, "val").paths
            except DataError:
                paths = list(self.files)
            return [read_file(self.fs, p) for p in evenly_spaced(paths, n)]
        if self.format == "parquet":
            import pyarrow.parquet as pq
            with self.fs.open_input_file(self.files[0]) as f:
                first = next(pq.ParquetFile(f).iter_batches(batch_size=window, columns=["image"]), None)
            blobs = first.column("image").field("bytes").to_pylist() if first is not None else []
        else:
            blobs = [data for data, _, _ in itertools.islice(tar_samples(self.fs, self.files[0]), window)]
        return evenly_spaced([b for b in blobs if b], n)


def open_source(fmt: str, uri: str, endpoint: str | None = None, region: str | None = None,
                access_key: str | None = None, secret_key: str | None = None) -> Source:
    """List and count the training images of `uri` in layout `fmt` (see the module doc)."""
    store = open_storage(uri, endpoint, region, access_key, secret_key)
    fs, path = store.fs, store.root
    if fmt == "imagefolder":
        folder = list_imagefolder(fs, path)
        return Source(fmt, uri, fs, path, tuple(folder.paths), len(folder), tuple(folder.classes),
                      labels=tuple(folder.labels))
    shards = list_shards(fs, path, fmt)
    folder = Storage(fs, shards[0].rsplit("/", 1)[0], uri)
    manifest = json.loads(folder.read(MANIFEST) or "null")
    counts = {folder.path(s["path"]): s["num_images"] for s in manifest["shards"]} if manifest else {}
    unknown = [s for s in shards if s not in counts]
    if unknown:  # published shards without our manifest: count them (in parallel)
        try:
            with ThreadPoolExecutor(16) as pool:
                counts.update(zip(unknown, pool.map(lambda s: count_shard(fs, s, fmt), unknown)))
        except (OSError, tarfile.TarError, pa.ArrowInvalid) as e:
            raise DataError(f"data.path: cannot read the {fmt} shards at {uri}: {e}") from None
    classes = tuple(json.loads(folder.read(CLASSES) or "[]"))
    num_images = sum(counts[s] for s in shards)
    if num_images == 0:
        raise DataError(f"data.path: the {len(shards)} {fmt} shards at {uri} hold no images")
    return Source(fmt, uri, fs, path, tuple(shards), num_images, classes, tuple(counts[s] for s in shards))


# --------------------------------------------------------------------------------------
# Reading samples: (encoded image bytes, label, name for messages)
# --------------------------------------------------------------------------------------


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def imagefolder_samples(fs: pafs.FileSystem, paths: list[str], labels: list[int]):
    """The files `paths` with their labels; a file that cannot be read gives empty bytes
    (counted as undecodable), not an error."""
    for path, label in zip(paths, labels):
        try:
            data = read_file(fs, path)
        except OSError as e:
            logger.warning("skipping %s: cannot read it: %s", path, e)
            data = b""
        yield data, label, path


def parquet_parts(rows: int, rows_per_part: int) -> int:
    """How many contiguous runs of row groups a Parquet shard of `rows` rows is read in."""
    return max(1, rows // rows_per_part)


def parquet_samples(fs: pafs.FileSystem, shard: str, batch_size: int, part: int = 0, parts: int = 1):
    """Samples of the `part`-th of `parts` contiguous runs of the shard's row groups."""
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        pf = pq.ParquetFile(f)
        n = pf.num_row_groups
        groups = list(range(part * n // parts, (part + 1) * n // parts))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=["image", "label"]):
            image = batch.column("image")
            blobs = image.field("bytes").to_pylist()
            names = (image.field("path").to_pylist() if image.type.get_field_index("path") >= 0
                     else [None] * len(blobs))
            for j, (data, label) in enumerate(zip(blobs, batch.column("label").to_pylist())):
                yield data, label, f"{shard}:{names[j] or j}"


def tar_samples(fs: pafs.FileSystem, shard: str):
    """Samples of a WebDataset tar: consecutive members grouped by `wds_member` key."""
    key, sample = None, {}

    def emit():
        data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), b"")
        try:
            label = int(sample.get("cls", b"-1"))
        except ValueError:
            label = -1
        return data, label, f"{shard}:{key}"

    with fs.open_input_stream(shard) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = wds_member(member.name)
            if k != key and key is not None:
                yield emit()
                sample = {}
            key = k
            if ext in (*WDS_IMAGE_KEYS, "cls"):
                sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield emit()
