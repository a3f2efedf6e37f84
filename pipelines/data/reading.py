"""Training images at rest: ImageNet's class folders, WebDataset tar shards or Parquet
shards, on a local/NFS path or an S3-compatible store. Listing, path patterns, counting, and
reading each layout into (encoded bytes, label, name) samples. No Ray here: streaming them
through Ray Data is `pipelines/data/stream.py`.

`open_source` lists the files and counts the images before anything runs, so the epoch
size (and with it the lr schedule) is right from step 0: from the listing (imagefolder),
from the `manifest.json` that `prepare_shards.py` writes, from the size files published
WebDataset sets carry (OpenCLIP's `sizes.json`, timm's `_info.json`), or else from the
shards themselves (Parquet footers; tar headers).

Reading survives damaged data and flaky storage: a transient storage error is retried with
backoff (`Retry`); what still cannot be read (a file, a tar member, a Parquet row group, a
shard that ends before the count it promised, a whole shard) is logged with where it was
and yields one lost sample (`data=None`) per image it held, which the stream counts as
skipped. Only the readers' own arguments can make them raise.
"""
import fnmatch
import itertools
import json
import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from cluster.storage import PERMANENT, Retry, Storage, open_storage, transient  # noqa: F401 (ours too)
from mae.view import evenly_spaced
from pipelines.common.errors import FatalError, one_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SHARD_EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png")
READ_BYTES = 8 * 2**20  # a read task reads its tar in reads of this size: one request each on S3
MANIFEST, CLASSES = "manifest.json", "classes.json"


class DataError(FatalError, ValueError):
    """The data path does not hold what the config says it holds: found before training
    starts, or by the stream (then it ends the run: a restart would meet it again)."""


# --------------------------------------------------------------------------------------
# Retrying storage
# --------------------------------------------------------------------------------------

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


class Paths:
    """File paths under a few folders, held compactly: the names as one UTF-8 buffer with
    their end offsets and each name's folder index (about 13 bytes per file beside its name;
    12.8 M ImageNet-style names take about 0.4 GB, where a tuple of their paths took 1.3 GB
    before the listing's own objects). A read-only sequence of str."""

    def __init__(self, folders: list[str], names: list):
        """`names`: each folder's file names, as a list of str or already `packed`."""
        self.folders = list(folders)
        blobs = [group if isinstance(group, bytes) else self.packed(group) for group in names]
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.ends = np.flatnonzero(self.buffer == 0).astype(np.int64)  # each name ends at a NUL
        self.folder_of = np.repeat(np.arange(len(blobs), dtype=np.int32), [blob.count(0) for blob in blobs])

    @staticmethod
    def packed(names: list[str]) -> bytes:
        """One folder's names as `Paths` holds them (UTF-8, each ended by a NUL)."""
        return "".join(f"{n}\0" for n in names).encode()

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # bounds, negative indices
        start = self.ends[i - 1] + 1 if i else 0
        return f"{self.folders[self.folder_of[i]]}/{self.buffer[start:self.ends[i]].tobytes().decode()}"

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Paths) and self.folders == other.folders and \
            np.array_equal(self.buffer, other.buffer) and np.array_equal(self.folder_of, other.folder_of)

    def nbytes(self) -> int:
        return self.buffer.nbytes + self.ends.nbytes + self.folder_of.nbytes + sum(map(len, self.folders))


@dataclass(frozen=True)
class ImageFolder:
    """The listing of `<root>/<split>/<class>/<image>`; labels index the sorted class names
    (as torchvision's ImageFolder gives them)."""
    root: str
    paths: Paths  # sorted by class, then name
    labels: np.ndarray  # int32, one per path
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_imagefolder(fs: pafs.FileSystem, root: str, split: str = "train") -> ImageFolder:
    """The images of `<root>/<split>/<class>/<image>` (`root` a path inside `fs`): the class
    folders listed, then each folder's images (16 listings in flight), kept compactly (`Paths`)
    as each folder's listing arrives, so that the driver never holds an object per file of
    the whole set."""
    top = f"{root.rstrip('/')}/{split}"
    if fs.get_file_info(top).type != pafs.FileType.Directory:
        raise DataError(f"data.path: {root!r} has no {split}/ folder (expected {top}/<class>/<image>)")
    try:
        entries = fs.get_file_info(pafs.FileSelector(top, recursive=False))
    except OSError as e:
        raise DataError(f"data.path: cannot list {top}: {e}") from None
    folders = sorted(i.path for i in entries if i.type == pafs.FileType.Directory)

    def images(folder: str) -> bytes:
        return Paths.packed(sorted(i.path[len(folder) + 1:] for i in _list_files(fs, folder, recursive=False)
                                   if i.path.lower().endswith(IMAGE_EXTENSIONS)))
    with ThreadPoolExecutor(16) as pool:
        names = list(pool.map(images, folders))
    kept = [(f, n) for f, n in zip(folders, names) if n]
    if not kept:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {top}/<class>/")
    paths = Paths([f for f, _ in kept], [n for _, n in kept])
    return ImageFolder(root, paths, paths.folder_of.copy(), [class_of(f"{f}/x") for f, _ in kept])


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


def file_infos(fs: pafs.FileSystem, paths) -> list[pafs.FileInfo]:
    """`fs.get_file_info` of each path, 16 in flight (a HEAD each on S3; pyarrow's own call
    with a list of paths makes them one after another)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(fs.get_file_info, paths))


def list_shards(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    """Shard files of `path`: a folder (searched recursively), a glob, or a brace pattern."""
    ext = SHARD_EXTENSIONS[fmt]
    if "{" in path:
        shards = expand_braces(path)
        missing = [p for p, i in zip(shards, file_infos(fs, shards)) if i.type != pafs.FileType.File]
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


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------


def count_parquet(fs: pafs.FileSystem, shard: str) -> int:
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        return pq.ParquetFile(f).metadata.num_rows


def count_tar(fs: pafs.FileSystem, shard: str) -> int:
    """Samples (image members) of a WebDataset tar, read through `READ_BYTES` at a time: a
    pass over its headers alone would seek to each one, on S3 a request per member."""
    n = 0
    with ReadAhead(fs.open_input_stream(shard)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        while (member := tar.next()) is not None:
            n += member.isfile() and wds_member(member.name)[1] in WDS_IMAGE_KEYS
            tar.members.clear()  # tarfile keeps every member it has read: 16 shards of them at a time
    return n


def check_parquet_schema(fs: pafs.FileSystem, shard: str) -> None:
    """The shard holds images as the published ImageNet Parquet shards do: an `image` struct
    with binary `bytes`, and an integer `label`; else a DataError naming what differs."""
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        schema = pq.read_schema(f)
    names = schema.names
    image = schema.field("image").type if "image" in names else None
    if image is None or not pa.types.is_struct(image) or image.get_field_index("bytes") < 0 \
            or not pa.types.is_binary(image.field("bytes").type) and not pa.types.is_large_binary(
                image.field("bytes").type):
        raise DataError(f"data.path: {shard} has no `image` column of struct<bytes: binary> "
                        f"(its columns: {', '.join(f'{n}: {schema.field(n).type}' for n in names)})")
    if "label" not in names or not pa.types.is_integer(schema.field("label").type):
        raise DataError(f"data.path: {shard} has no integer `label` column (its columns: {', '.join(names)})")


def count_shard(fs: pafs.FileSystem, shard: str, fmt: str) -> int:
    return (count_parquet if fmt == "parquet" else count_tar)(fs, shard)


def parquet_row_groups(fs: pafs.FileSystem, shard: str) -> tuple[int, ...]:
    """Rows of each row group of a Parquet shard (its footer only): where it can be split."""
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        meta = pq.ParquetFile(f).metadata
        return tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))


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
    files: "Paths | tuple[str, ...]"  # image files (imagefolder: compact, `Paths`) or shards
    num_images: int
    classes: tuple[str, ...]  # class names (imagefolder, or the shards' classes.json); may be empty
    counts: tuple[int, ...] = ()  # images per shard (webdataset, parquet)
    labels: "np.ndarray | tuple" = ()  # label of each image file (imagefolder: int32)

    def __len__(self) -> int:
        return self.num_images

    def held_out(self, n: int, window: int = 256) -> list[bytes]:
        """Encoded bytes of up to `4 n` fixed images to pick the figures' `n` from: from `val/`
        of an imagefolder when it has one, else evenly spaced over the training images (for
        shards: over the first `window` images of the first shard, so that a 512 MB shard is
        not read on the driver before training starts). Not decoded here: the driver loads no
        pixel code (torchvision: ~2 s of CPU at each run's start); where they are decoded,
        `mae.transforms.decodable` keeps `n` that decode."""
        if self.format == "imagefolder":
            try:
                paths = list_imagefolder(self.fs, self.root, "val").paths
            except DataError:
                paths = list(self.files)
            picked = evenly_spaced(paths, 4 * n)
            with ThreadPoolExecutor(16) as pool:  # one request each: in flight together
                return list(pool.map(lambda p: read_file(self.fs, p), picked))
        if self.format == "parquet":
            import pyarrow.parquet as pq
            with self.fs.open_input_file(self.files[0]) as f:
                first = next(pq.ParquetFile(f).iter_batches(batch_size=window, columns=["image"]), None)
            blobs = first.column("image").field("bytes").to_pylist() if first is not None else []
        else:
            blobs = [data for data, _, _ in itertools.islice(tar_samples(self.fs, self.files[0]), window)]
        return evenly_spaced([b for b in blobs if b], 4 * n)


def count_here(fs: pafs.FileSystem, shards: list[str], fmt: str) -> list[int]:
    """Images of each shard, counted by this process, 16 shards at a time."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda s: count_shard(fs, s, fmt), shards))


def open_source(fmt: str, uri: str, endpoint: str | None = None, region: str | None = None,
                credentials_file: str | None = None, split: str = "train", count=count_here) -> Source:
    """List and count the images of `uri` in layout `fmt` (see the module doc); `split`: the
    imagefolder's folder under `uri` (train, val); `count(fs, shards, fmt)`: the images of
    each shard that neither a manifest nor a size file counts (a bare tar is read through;
    the driver passes `stream.count_in_tasks`, which reads them in Ray tasks on the cluster)."""
    store = open_storage(uri, endpoint, region, credentials_file)
    fs, path = store.fs, store.root
    if fmt == "imagefolder":
        folder = list_imagefolder(fs, path, split)
        return Source(fmt, uri, fs, path, folder.paths, len(folder), tuple(folder.classes), labels=folder.labels)
    shards = list_shards(fs, path, fmt)
    if fmt == "parquet":
        try:
            check_parquet_schema(fs, shards[0])  # the others are checked as they are read
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"data.path: cannot read the parquet shard {shards[0]}: {e}") from None
    folder = Storage(fs, shards[0].rsplit("/", 1)[0], uri)
    manifest = json.loads(folder.read(MANIFEST) or "null")
    counts = {folder.path(s["path"]): s["num_images"] for s in manifest["shards"]} if manifest else {}
    unknown = [s for s in shards if s not in counts]
    if unknown:  # published shards: the sizes their publisher wrote beside them
        published = published_counts(folder)
        counts.update({s: published[s.rsplit("/", 1)[-1]] for s in unknown if s.rsplit("/", 1)[-1] in published})
        unknown = [s for s in shards if s not in counts]
    if unknown:  # shards nobody counted: count them (in parallel)
        try:
            counts.update(zip(unknown, count(fs, unknown, fmt), strict=True))
        except (OSError, tarfile.TarError, pa.ArrowInvalid) as e:
            raise DataError(f"data.path: cannot read the {fmt} shards at {uri}: {e}") from None
    classes = tuple(json.loads(folder.read(CLASSES) or "[]"))
    num_images = sum(counts[s] for s in shards)
    if num_images == 0:
        raise DataError(f"data.path: the {len(shards)} {fmt} shards at {uri} hold no images")
    return Source(fmt, uri, fs, path, tuple(shards), num_images, classes, tuple(counts[s] for s in shards))


SIZE_FILES = ("sizes.json", "_info.json", "info.json", "_info.yaml")


def published_counts(folder: Storage) -> dict[str, int]:
    """Images per shard (by file name) as published WebDataset sets state them beside their
    shards: OpenCLIP's `sizes.json` ({shard: count}), timm's `_info.json` / `info.json` /
    `_info.yaml` (per split: `filenames` with `shard_lengths`); {} where there is none. A
    size file that does not parse is named."""
    import yaml
    for name in SIZE_FILES:
        raw = folder.read(name)
        if raw is None:
            continue
        try:
            info = yaml.safe_load(raw) if name.endswith(".yaml") else json.loads(raw)
            if name == "sizes.json":
                return {k.rsplit("/", 1)[-1]: int(v) for k, v in info.items()}
            return {f.rsplit("/", 1)[-1]: int(n) for split in info["splits"].values()
                    for f, n in zip(split["filenames"], split["shard_lengths"], strict=True)}
        except (ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as e:
            raise DataError(f"data.path: {folder.path(name)} does not give the shards' sizes "
                            f"({type(e).__name__}: {e}); fix or remove it") from None
    return {}


# --------------------------------------------------------------------------------------
# Reading samples: (encoded image bytes, label, name for messages); bytes None: lost
# --------------------------------------------------------------------------------------


def read_file(fs: pafs.FileSystem, path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of `path`; with `max_bytes`, a larger file is refused (ValueError) before it
    is read."""
    with fs.open_input_file(path) as f:
        if max_bytes is not None and f.size() > max_bytes:
            raise ValueError(f"file is {f.size()} bytes, over data.max_image_bytes={max_bytes}")
        return f.read()


def imagefolder_samples(fs: pafs.FileSystem, paths: list[str], labels: list[int], retry: Retry = Retry(),
                        max_bytes: int | None = None):
    """The files `paths` with their labels; a file that cannot be read (after retries) or is
    over `max_bytes` is lost, not an error."""
    for path, label in zip(paths, labels):
        try:
            data = retry.call(lambda: read_file(fs, path, max_bytes), f"reading {path}")
        except (OSError, ValueError) as e:
            logger.warning("skipping %s: cannot read it: %s", path, e)
            data = None
        yield data, label, path


def parquet_parts(rows: int, rows_per_part: int) -> int:
    """How many contiguous runs of row groups a Parquet shard of `rows` rows is read in."""
    return max(1, rows // rows_per_part)


def part_rows(rows: int, part: int, parts: int) -> int:
    """Rows promised to the `part`-th of `parts` runs of a shard of `rows` rows (the runs
    split the row groups; these split the rows the same way, summing to `rows`)."""
    return (part + 1) * rows // parts - part * rows // parts


def lost(n: int, where: str, why, label: int = -1):
    """`n` lost samples of `where`, logged once."""
    if n > 0:
        logger.warning("skipping %d images of %s: %s", n, where, one_line(why))
    for _ in range(max(n, 0)):
        yield None, label, where


def parquet_samples(fs: pafs.FileSystem, shard: str, batch_size: int, part: int = 0, parts: int = 1,
                    expected: int | None = None, retry: Retry = Retry()):
    """Samples of the `part`-th of `parts` contiguous runs of the shard's row groups. A row
    group that does not parse is lost (its rows, from the footer); a shard whose footer does
    not parse is lost whole (`expected` rows, the count it was listed with)."""
    import pyarrow.parquet as pq

    def open_file():
        f = fs.open_input_file(shard)
        try:
            return f, pq.ParquetFile(f)
        except BaseException:
            f.close()
            raise

    try:
        f, pf = retry.call(open_file, f"opening {shard}")
    except (OSError, pa.ArrowException, ValueError) as e:
        yield from lost(expected or 0, shard, f"cannot open it: {e}")
        return
    try:
        n = pf.num_row_groups
        for g in range(part * n // parts, (part + 1) * n // parts):
            rows = pf.metadata.row_group(g).num_rows
            where = f"{shard} row group {g}"

            def read_group():
                nonlocal f, pf
                try:
                    return pf.read_row_group(g, columns=["image", "label"])
                except OSError as e:
                    if transient(e):  # the next try reads through a new connection
                        f.close()
                        f, pf = open_file()
                    raise

            try:
                table = retry.call(read_group, f"reading {where}")
            except (OSError, pa.ArrowException, ValueError, KeyError) as e:
                yield from lost(rows, where, f"cannot read it: {e}")
                continue
            for batch in table.to_batches(max_chunksize=batch_size):
                image = batch.column("image")
                blobs = image.field("bytes").to_pylist()
                names = (image.field("path").to_pylist() if image.type.get_field_index("path") >= 0
                         else [None] * len(blobs))
                for j, (data, label) in enumerate(zip(blobs, batch.column("label").to_pylist())):
                    yield data if data is not None else b"", label, f"{shard}:{names[j] or j}"
    finally:
        f.close()


def tar_header_at(f, start: int, end: int | None = None) -> tuple[int, memoryview] | None:
    """The offset of the first tar header at or after byte `start` of the open file `f` (on a
    512-byte boundary, "ustar" magic, a valid checksum), read `READ_BYTES` at a time (up to
    about `end`, where the caller's range ends: `ReadAhead.request`), and the bytes read from
    there on (the caller goes on from them: nothing is read twice); None when there is none
    (past the last member)."""
    pos = -(-start // 512) * 512
    size = f.size()
    while pos < size:
        f.seek(pos)
        chunk = f.read(min(ReadAhead.request(pos, end), size - pos))
        at = chunk.find(b"ustar", 257)
        while at != -1:
            k = at - 257
            if k % 512 == 0 and k + 512 <= len(chunk):
                try:
                    tarfile.TarInfo.frombuf(chunk[k:k + 512], "utf-8", "surrogateescape")
                    return pos + k, memoryview(chunk)[k:]
                except tarfile.HeaderError:
                    pass
            at = chunk.find(b"ustar", at + 1)
        if len(chunk) < 512:
            return None
        pos += len(chunk) - len(chunk) % 512
    return None


class ReadAhead:
    """A read-only stream of `head` (bytes already read), then of `raw` (a pyarrow stream or
    file, from where it stands: byte `pos` of its object) `READ_BYTES` per request, the next
    request in flight in a thread of its own while the bytes of this one are used (decoded):
    at most two requests' bytes held at once. With `end` (where a byte range ends; its reader
    reads on only through the sample in progress there) requests stop at `end` and go on past
    it `AFTER_END` at a time, so a range costs little more than its own bytes."""
    AFTER_END = 256 * 2**10

    def __init__(self, raw, head: bytes | memoryview = b"", pos: int = 0, end: int | None = None):
        self.raw, self.end, self.pos = raw, end, pos + len(head)  # pos: of the next request
        self.buf, self.at, self.ended = memoryview(head), 0, False
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self.next = self._ask()

    @staticmethod
    def request(pos: int, end: int | None) -> int:
        """Bytes of the request at byte `pos`: `READ_BYTES`, cut at `end` (never below
        `AFTER_END`), `AFTER_END` past it."""
        return READ_BYTES if end is None else min(READ_BYTES, max(end - pos, ReadAhead.AFTER_END))

    def _ask(self):
        n = self.request(self.pos, self.end)
        self.pos += n
        return self.pool.submit(self.raw.read, n), n

    def _refill(self) -> bool:
        """The next request's bytes in `buf` (and the one after it asked for); False at the end."""
        if self.ended:
            return False
        future, asked = self.next
        data = future.result()
        if len(data) < asked:  # a stream's read is short only at its end
            self.ended = True
        else:
            self.next = self._ask()
        self.buf, self.at = memoryview(data), 0
        return len(data) > 0

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n is not None and n >= 0 else None
        while want is None or want > 0:
            if self.at >= len(self.buf) and not self._refill():
                break
            stop = len(self.buf) if want is None else min(len(self.buf), self.at + want)
            out.append(bytes(self.buf[self.at:stop]))
            if want is not None:
                want -= stop - self.at
            self.at = stop
        return b"".join(out)

    def close(self) -> None:
        self.ended = True
        self.pool.shutdown(wait=True, cancel_futures=True)  # a request in flight ends before the file closes
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tar_pass(fs: pafs.FileSystem, shard: str, skip: int, max_bytes: int | None, byte_range: tuple | None):
    """One pass over a WebDataset tar (or its byte range: see `tar_samples`), its first
    `skip` samples passed over unread. A sample is a run of members with one key; a range
    [start, end) gives the samples after the one holding the first header at or after
    `start` (that one is the previous range's), up to and including the one holding the
    first header at or after `end`: consecutive ranges give every sample once."""
    start, end = byte_range or (0, None)
    if start:  # the file opened once: its first header found, the pass goes on from the bytes read
        f = fs.open_input_file(shard)
        found = tar_header_at(f, start, end)
        if found is None:
            f.close()
            return
        begin, head = found
        f.seek(begin + len(head))
    else:
        begin = 0
    key, sample = None, {}
    first = start > 0  # the sample in progress at `start`: the previous range's
    reaches_end = False  # the sample in progress holds the first header at or after `end`

    def emit():
        data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), b"")
        try:
            label = int(sample.get("cls", b"-1"))
        except ValueError:
            label = -1
        return data, label, f"{shard}:{key}"

    def stream():  # READ_BYTES at a time: tarfile reads 10 KB records, on S3 each its own request
        return ReadAhead(f, head, begin, end) if start else ReadAhead(fs.open_input_stream(shard), end=end)

    with stream() as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = wds_member(member.name)
            if k != key and key is not None:
                if first:
                    first = False
                elif skip > 0:
                    skip -= 1
                else:
                    yield emit()
                if reaches_end:
                    return  # the next sample is the next range's
                sample = {}
            key = k
            if end is not None and begin + member.offset >= end:
                reaches_end = True
            if ext in WDS_IMAGE_KEYS and max_bytes is not None and member.size > max_bytes:
                logger.warning("skipping %s:%s: %d bytes, over data.max_image_bytes=%d", shard, member.name,
                               member.size, max_bytes)
                sample[ext] = None
            elif ext in (*WDS_IMAGE_KEYS, "cls") and skip == 0 and not first:
                sample[ext] = tar.extractfile(member).read()
    if key is not None and skip == 0 and not first:
        yield emit()


def tar_samples(fs: pafs.FileSystem, shard: str, expected: int | None = None, retry: Retry = Retry(),
                max_bytes: int | None = None, byte_range: tuple[int, int] | None = None):
    """Samples of a WebDataset tar: consecutive members grouped by `wds_member` key; with
    `byte_range` (start, end), those of that part of the shard (`_tar_pass`: found from its
    headers by the reader itself, no pass over the shard before). A transient storage error
    mid-shard reopens it (after a backoff) and skips the samples already given; a shard that
    is damaged or ends early ends there, its samples short of `expected` (its listed count)
    lost; an image member over `max_bytes` is lost unread."""
    given = 0
    it, spent, end = None, 0, object()  # spent: failed reads, so retries, of the whole shard

    def next_sample():
        nonlocal it, spent
        if it is None:
            it = _tar_pass(fs, shard, given, max_bytes, byte_range)
        try:
            return next(it, end)
        except Exception:
            it, spent = None, spent + 1  # a retry reopens the shard and skips the samples given
            raise

    try:
        while True:
            try:
                sample = retry.call(next_sample, f"reading {shard} after {given} samples", spent)
            except (OSError, tarfile.TarError, EOFError, ValueError) as e:
                yield from lost((expected or given) - given, shard, f"unreadable after {given} samples: {e}")
                return
            if sample is end:
                break
            given += 1
            yield sample
    finally:
        if it is not None:
            it.close()
    if expected is not None and given < expected:
        yield from lost(expected - given, shard, f"ends after {given} of the {expected} samples it was counted with")

