"""The three source layouts, local and on the S3-compatible server: what goes in comes out
(count, labels, pixels); the converter's shards read back; real-world files."""
import collections
import hashlib
import io
import json
import shutil
import struct
import zlib

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from cluster.storage import open_storage
from conftest import add_broken_files_to
from mae.transforms import PRETRAIN, decodable, decode_rgb, eval_resize_crop
from pipelines.common.config import DataConfig
from pipelines.prepare_shards import convert, parse_size
from pipelines.data.reading import (DataError, expand_braces, list_imagefolder, list_shards, open_source,
                                     tar_samples)
from pipelines.data.stream import image_stream

SIZE = 32


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """24 real photographs (500x375 JPEG q90) in 3 classes, plus the oddities of ImageNet that
    must decode (CMYK, grayscale, a PNG named .JPEG)."""
    from pipelines.data.demo_data import write_photos
    root = write_photos(tmp_path_factory.mktemp("photos") / "p", 24, num_classes=3)
    base = Image.open(next((root / "train" / "n00000000").iterdir())).convert("RGB")
    base.convert("CMYK").save(root / "train" / "n00000001" / "cmyk.JPEG", format="JPEG", quality=90)
    base.convert("L").save(root / "train" / "n00000002" / "gray.JPEG", format="JPEG", quality=90)
    base.save(root / "train" / "n00000002" / "png_named.JPEG", format="PNG")
    return root


def add_broken_files(root) -> int:
    return add_broken_files_to(root / "train" / "n00000001")


def expected(root) -> collections.Counter:
    """(label, digest of the centre crop) of every image of an ImageFolder."""
    folder = list_imagefolder(pafs.LocalFileSystem(), str(root))
    out = collections.Counter()
    for p, label in zip(folder.paths, folder.labels):
        crop = eval_resize_crop(decode_rgb(open(p, "rb").read()), SIZE).numpy()
        out[(label, hashlib.sha1(crop.tobytes()).hexdigest())] += 1
    return out


def streamed(source, augment=None):
    rows = stream(source, seed=0, batch=8, files_per_task=5, augment=augment).take_all()
    return collections.Counter((int(r["label"]), hashlib.sha1(r["image"].tobytes()).hexdigest()) for r in rows), rows


def stream(source, size=SIZE, seed=0, batch=256, files_per_task=1024, augment=PRETRAIN, ahead_bytes=None):
    """The training stream of `source` with these data.* settings."""
    data = DataConfig(decode_batch_size=batch, read_files_per_task=files_per_task, object_store_memory=ahead_bytes)
    return image_stream(source, data, size, seed, augment=augment)


def upload(local_dir, fs, prefix):
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        target = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as f:
            f.write(path.read_bytes())


def s3fs(endpoint):
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", force_virtual_addressing=False)


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset"])
def test_every_format_local_and_on_s3_gives_back_what_went_in(ray_client, photos, s3_server, tmp_path, fmt):
    want = expected(photos)
    if fmt == "imagefolder":
        local = str(photos)
        upload(photos / "train", s3fs(s3_server), f"runs/data-{fmt}/train")
    else:
        local = str(tmp_path / fmt)
        manifest = convert(str(photos), local, fmt, shard_size=400 * 2**10)
        assert manifest["num_images"] == sum(want.values()) and manifest["num_shards"] >= 3
        convert(str(photos), f"s3://runs/data-{fmt}", fmt, shard_size=400 * 2**10, s3_endpoint=s3_server)
    for uri in (local, f"s3://runs/data-{fmt}"):
        source = open_source(fmt, uri, endpoint=s3_server)
        assert len(source) == sum(want.values())
        got, rows = streamed(source)
        assert got == want  # count, label histogram and the pixels of each centre crop
        assert all(r["skipped"] == 0 for r in rows)


def test_a_tar_on_s3_is_read_in_large_requests_not_one_per_record(photos, s3_server, tmp_path, monkeypatch):
    """tarfile reads 10 KB records: unbuffered, each was its own ranged GET on S3 (~11 per
    ImageNet-size image). A read task reads its shard `READ_BYTES` at a time, whole or from a
    sample's offset; here 256 KB reads of a ~2.7 MB tar (production: 8 MB)."""
    from s3_proxy import S3Proxy
    from pipelines.data import reading
    convert(str(photos), str(tmp_path / "wds"), "webdataset", shard_size=64 * 2**20)
    (tar,) = (tmp_path / "wds").glob("*.tar")
    upload(tmp_path / "wds", s3fs(s3_server), "runs/reads")
    proxy = S3Proxy(s3_server)
    fs = s3fs(proxy.endpoint)
    monkeypatch.setattr(reading, "READ_BYTES", 256 * 2**10)
    try:
        def gets(read):
            before = len(proxy.log)
            n = sum(1 for data, _, _ in read() if data)
            return n, sum(1 for method, _, _ in proxy.log[before:] if method == "GET")

        size, n = tar.stat().st_size, sum(1 for _ in reading.tar_samples(pafs.LocalFileSystem(), str(tar)))
        assert size > 2 * 2**20 and gets(lambda: reading.tar_samples(fs, f"runs/reads/{tar.name}")) == \
            (n, pytest.approx(size / (256 * 2**10), abs=2))
        half = (size // 2, size)  # the second half: its first header found by the reader, then read on
        got, requests = gets(lambda: reading.tar_samples(fs, f"runs/reads/{tar.name}", byte_range=half))
        # the bytes read to find the first header are not read again (they were: +1 GET)
        assert n // 3 < got < n and requests <= -(-(size - size // 2) // (256 * 2**10)) + 1, requests
    finally:
        proxy.close()


def test_the_next_read_of_a_tar_is_in_flight_while_its_samples_are_decoded(photos, s3_server, tmp_path,
                                                                            monkeypatch):
    """A read task asks for its tar's next `READ_BYTES` while it decodes the bytes it has: here
    the reader holds its first sample (as if decoding it) and the next request reaches the
    store meanwhile; at most that one request ahead. Then every sample comes, in order."""
    import time

    from s3_proxy import S3Proxy
    from pipelines.data import reading
    convert(str(photos), str(tmp_path / "wds"), "webdataset", shard_size=64 * 2**20)
    (tar,) = (tmp_path / "wds").glob("*.tar")
    upload(tmp_path / "wds", s3fs(s3_server), "runs/ahead")
    proxy = S3Proxy(s3_server)
    monkeypatch.setattr(reading, "READ_BYTES", 256 * 2**10)
    local = [name for _, _, name in reading.tar_samples(pafs.LocalFileSystem(), str(tar))]
    try:
        gets = lambda: sum(1 for method, path, _ in proxy.log if method == "GET" and "/ahead/" in path)  # noqa: E731
        samples = reading.tar_samples(s3fs(proxy.endpoint), f"runs/ahead/{tar.name}")
        first = next(samples)
        deadline = time.monotonic() + 10
        while gets() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert gets() == 2  # the first read, and the next one in flight: no further
        names = [first[2]] + [name for _, _, name in samples]
    finally:
        proxy.close()
    assert [n.rsplit(":", 1)[1] for n in names] == [n.rsplit(":", 1)[1] for n in local]


def test_a_tar_split_at_any_byte_ranges_gives_every_sample_once_in_order(tmp_path):
    """A tar cut into byte ranges at arbitrary points: each range's reader finds its first
    header itself (512-byte aligned, checksum), passes over the sample in progress (the
    previous range's) and reads on through the sample in progress at its end. Members of
    every size, a member larger than several ranges, samples of 1-3 members: every sample
    once, in order, whatever the cut."""
    import random
    import tarfile

    from pipelines.data.reading import tar_samples
    rng, path = random.Random(0), tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(60):
            size = 300_000 if i == 17 else rng.choice([10, 600, 5_000, 40_000])
            members = {"jpg": bytes([i % 251]) * size, "cls": str(i).encode()}
            if i % 3 == 0:
                members["json"] = b"{}"
            for ext, data in members.items():
                info = tarfile.TarInfo(f"shard/{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    fs, size = pafs.LocalFileSystem(), path.stat().st_size
    whole = [(label, name) for _, label, name in tar_samples(fs, str(path))]
    assert [label for label, _ in whole] == list(range(60))
    for parts in (1, 2, 3, 7, 16, 60, 200):
        bounds = sorted({0, size, *(rng.randrange(size) for _ in range(parts - 1))})
        got = [(label, name) for a, b in zip(bounds, bounds[1:])
               for _, label, name in tar_samples(fs, str(path), byte_range=(a, b))]
        assert got == whole, parts


def test_16_bit_images_are_scaled_to_8_bits_not_wrapped(ray_client, tmp_path):
    """A 16-bit ramp (a grayscale PNG, and an RGB one of 16 bits per channel) comes out of the
    stream as the same ramp in 8 bits, not its values modulo 256."""
    from crafted import png_chunk
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))  # left to right, dark to light
    folder = tmp_path / "train" / "ramps"
    folder.mkdir(parents=True)
    Image.fromarray(ramp).save(folder / "gray16.png", format="PNG")  # mode I;16
    rows48 = b"".join(b"\x00" + np.repeat(row, 3).astype(">u2").tobytes() for row in ramp)  # filter 0, R=G=B
    (folder / "rgb48.png").write_bytes(  # Pillow cannot write 16-bit RGB: the chunks by hand
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows48)) + png_chunk(b"IEND", b""))
    rows = stream(open_source("imagefolder", str(tmp_path)), batch=2, augment=None).take_all()
    want = eval_resize_crop(torch.from_numpy(np.repeat((ramp >> 8).astype(np.uint8)[None], 3, axis=0)), SIZE)
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)
    for r in rows:
        assert r["image"].dtype == np.uint8 and np.array_equal(r["image"], want.numpy())
        assert (np.diff(r["image"][..., 0].astype(int), axis=1) >= 0).all()  # still a ramp


def test_training_crops_are_random_uint8_and_new_each_epoch(ray_client, photos):
    ds = stream(open_source("imagefolder", str(photos)), batch=8)
    first = [r["image"] for r in ds.take_all()]
    second = [r["image"] for r in ds.take_all()]
    assert first[0].dtype == np.uint8 and first[0].shape == (SIZE, SIZE, 3)
    digests = [{hashlib.sha1(i.tobytes()).hexdigest() for i in epoch} for epoch in (first, second)]
    assert not digests[0] & digests[1]  # fresh crops every execution


def test_file_and_shard_order_is_reshuffled_every_epoch(ray_client, photos, tmp_path):
    convert(str(photos), str(tmp_path / "wds"), "webdataset", shard_size=100 * 2**10)
    for fmt, path in (("imagefolder", str(photos)), ("webdataset", str(tmp_path / "wds"))):
        ds = stream(open_source(fmt, path), seed=3, batch=8, augment=None)
        orders = [[int(r["label"]) * 0 + hash(r["image"].tobytes()) for r in ds.take_all()] for _ in range(3)]
        assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
        assert len({tuple(o) for o in orders}) == 3, fmt


def test_decoding_stays_within_its_budget_ahead_of_a_slow_consumer(ray_client, photos):
    import time

    import ray
    size, batch = 128, 4
    block = batch * size * size * 3  # 196 kB: over Ray's 100 kB inline limit, so blocks sit in the object store
    ds = stream(open_source("imagefolder", str(photos)), size, batch=batch, files_per_task=batch,
                ahead_bytes=2 * block)
    total = ray.cluster_resources()["object_store_memory"]

    def used():
        return total - ray.available_resources().get("object_store_memory", 0)

    before, peak, rows = used(), 0, 0
    for b in ds.iter_batches(batch_size=batch, prefetch_batches=0):
        rows += len(b["label"])
        time.sleep(0.3)  # decoding 4 images takes ~5 ms: unchecked, every block would be decoded by now
        peak = max(peak, used() - before)
    assert rows == 27
    # the budget, the block being consumed and the read tasks themselves (with no budget: 5 blocks)
    assert peak <= 3.5 * block, f"{peak / block:.1f} blocks held"


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset"])
def test_undecodable_files_are_skipped_counted_and_replaced(ray_client, photos, tmp_path, fmt, caplog):
    root = tmp_path / "broken"
    shutil.copytree(photos, root)
    bad = add_broken_files(root)
    if fmt != "imagefolder":
        convert(str(root), str(tmp_path / fmt), fmt, shard_size=400 * 2**10)  # bytes stored as they are
        root = tmp_path / fmt
    source = open_source(fmt, str(root))
    total = sum(expected(photos).values()) + bad
    assert len(source) == total
    _, rows = streamed(source, augment=PRETRAIN)
    assert sum(1 for r in rows if r["skipped"] == 0) == total - bad  # every good image, once
    # fresh crops of good images stand in for the broken ones, except in a read unit that held
    # nothing but broken images (the count of skips stays exact: test_hostile.py)
    assert len(rows) <= total and sum(int(r["skipped"]) for r in rows) == len(rows) - (total - bad)


def test_converter_is_idempotent_and_refuses_other_arguments(ray_client, photos, tmp_path):
    dst = tmp_path / "pq"
    first = convert(str(photos), str(dst), "parquet", shard_size=300 * 2**10)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dst.glob("*.parquet")}
    second = convert(str(photos), str(dst), "parquet", shard_size=300 * 2**10)
    assert second["reused_shards"] == second["num_shards"] == first["num_shards"] == len(stamps)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dst.glob("*.parquet")} == stamps
    assert second["num_images"] == first["num_images"]
    assert json.loads((dst / "classes.json").read_text()) == ["n00000000", "n00000001", "n00000002"]
    assert not list(dst.glob(".*"))  # no temporary files left
    # an interrupted run: one shard missing, the rest kept
    victim = sorted(stamps)[1]
    (dst / victim).unlink()
    third = convert(str(photos), str(dst), "parquet", shard_size=300 * 2**10)
    assert third["reused_shards"] == len(stamps) - 1 and (dst / victim).read_bytes() == stamps[victim][1]
    with pytest.raises(DataError, match="other arguments"):
        convert(str(photos), str(dst), "parquet", shard_size=300 * 2**10, max_side=320)


def test_max_side_reencodes_and_skips_what_does_not_decode(ray_client, photos, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(photos, root)
    bad = add_broken_files(root)
    manifest = convert(str(root), str(tmp_path / "small"), "webdataset", max_side=320)
    assert len(manifest["skipped"]) == bad and manifest["num_images"] == sum(expected(photos).values())
    source = open_source("webdataset", str(tmp_path / "small"))
    for blob in source.held_out(4):
        img = Image.open(io.BytesIO(blob))
        assert img.format == "JPEG" and max(img.size) == 320


def test_epoch_size_without_a_manifest_and_path_patterns(ray_client, photos, tmp_path):
    for fmt, ext in (("parquet", "parquet"), ("webdataset", "tar")):
        dst = tmp_path / fmt
        manifest = convert(str(photos), str(dst), fmt, shard_size=300 * 2**10)
        (dst / "manifest.json").unlink()  # as published shards come: counted from footers / headers
        n = manifest["num_shards"]
        assert len(open_source(fmt, str(dst))) == manifest["num_images"]
        assert len(open_source(fmt, f"{dst}/train-*.{ext}")) == manifest["num_images"]
        brace = f"{dst}/train-{{00000..{n - 1:05d}}}-of-{n:05d}.{ext}"
        assert len(list_shards(pafs.LocalFileSystem(), brace, fmt)) == n
        assert len(open_source(fmt, brace)) == manifest["num_images"]
        figures = decodable(open_source(fmt, str(dst)).held_out(3, window=5), 3)  # of the first shard's first 5
        assert len(set(figures)) == 3 and all(decode_rgb(b).shape[0] == 3 for b in figures)
    assert expand_braces("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5GiB") == int(1.5 * 2**30)


def test_published_webdataset_sizes_are_read_not_counted(photos, s3_server, tmp_path):
    """Shards as published: no manifest of ours, but OpenCLIP's sizes.json or timm's
    _info.json / _info.yaml beside them. The counts come from that file (here made one more
    per shard than the tars hold, to tell them apart), and on S3 no shard is read to count."""
    import yaml
    from s3_proxy import S3Proxy
    dst = tmp_path / "wds"
    manifest = convert(str(photos), str(dst), "webdataset", shard_size=300 * 2**10)
    (dst / "manifest.json").unlink()
    shards = {s["path"].rsplit("/", 1)[-1]: s["num_images"] + 1 for s in manifest["shards"]}
    claimed = manifest["num_images"] + len(shards)
    timm = {"name": "digits", "splits": {
        "train": {"name": "train", "num_samples": claimed, "filenames": list(shards),
                  "shard_lengths": list(shards.values())},
        "validation": {"name": "validation", "num_samples": 5, "filenames": ["val-0.tar"], "shard_lengths": [5]}}}
    for name, text in (("sizes.json", json.dumps(shards)), ("_info.json", json.dumps(timm)),
                       ("_info.yaml", yaml.safe_dump(timm))):
        (dst / name).write_text(text)
        assert len(open_source("webdataset", str(dst))) == claimed, name
        (dst / name).unlink()
    assert len(open_source("webdataset", str(dst))) == manifest["num_images"]  # none: counted from the tars
    (dst / "sizes.json").write_text('{"train-00000-of-00009.tar": "many"}')
    with pytest.raises(DataError, match=r"sizes.json does not give the shards' sizes \(ValueError"):
        open_source("webdataset", str(dst))
    (dst / "sizes.json").write_text(json.dumps(shards))
    upload(dst, s3fs(s3_server), "runs/published")
    proxy = S3Proxy(s3_server)
    try:
        assert len(open_source("webdataset", "s3://runs/published", endpoint=proxy.endpoint)) == claimed
        assert not [path for method, path, _ in proxy.log if method == "GET" and ".tar" in path]
    finally:
        proxy.close()


def test_bare_tars_are_counted_by_ray_tasks_on_the_cluster_not_by_the_driver(ray_client, photos, tmp_path,
                                                                              monkeypatch):
    """Shards that neither a manifest nor a size file counts: the driver's count
    (`launch.count_on_cluster`) has Ray tasks read them through; this process reads none (its
    own tar counter is replaced by one that fails). A shard that is no tar is named."""
    import pipelines.data.reading as reading
    from pipelines.driver.launch import count_on_cluster
    dst = tmp_path / "wds"
    manifest = convert(str(photos), str(dst), "webdataset", shard_size=300 * 2**10)
    (dst / "manifest.json").unlink()

    def not_here(fs, shard):
        raise AssertionError(f"the driver read {shard} to count it")
    monkeypatch.setattr(reading, "count_tar", not_here)
    source = open_source("webdataset", str(dst), count=count_on_cluster(verbose=False))
    assert len(source.files) > 1 and list(source.counts) == [s["num_images"] for s in manifest["shards"]]
    (dst / "zz-not-a.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match=r"cannot read the webdataset shards at .*: .*"):
        open_source("webdataset", str(dst), count=count_on_cluster(verbose=False))


def test_a_brace_patterns_shards_are_looked_up_concurrently(photos, s3_server, tmp_path):
    """`s-{0000..0011}.tar` on S3: a HEAD per shard, several in flight at once (each held
    0.2 s by the proxy), not one after another."""
    import threading
    import time

    from s3_proxy import S3Proxy
    body = (photos / "train").rglob("*.JPEG").__next__().read_bytes()
    fs = s3fs(s3_server)
    for i in range(12):
        with fs.open_output_stream(f"runs/braces/s-{i:04d}.tar") as f:
            f.write(body)
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def hold(method, path, headers):
        if method == "HEAD" and "/braces/s-" in path:
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.2)
            with lock:
                state["now"] -= 1
    proxy = S3Proxy(s3_server, hold)
    try:
        store = open_storage("s3://runs/braces", proxy.endpoint)
        assert len(list_shards(store.fs, "runs/braces/s-{0000..0011}.tar", "webdataset")) == 12
    finally:
        proxy.close()
    assert state["most"] >= 4, state


def test_missing_or_empty_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="no .tar shards"):
        open_source("webdataset", str(tmp_path))
    with pytest.raises(DataError, match="1 of the 2 shards of the pattern do not exist"):
        (tmp_path / "s-0.tar").write_bytes(b"")
        open_source("webdataset", f"{tmp_path}/s-{{0..1}}.tar")
    with pytest.raises(DataError, match="has no train/ folder"):
        open_source("imagefolder", str(tmp_path))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_one_shard_is_split_for_every_decoder_and_each_image_read_once(ray_client, photos, tmp_path, fmt):
    """Fewer shards than decoders: a Parquet shard splits by row groups, a tar by byte ranges
    (nothing of it read to plan them); every image comes out exactly once."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.data.skips import skip_counter
    from pipelines.data.stream import ImageDatasource, View
    convert(str(photos), str(tmp_path / "one"), fmt, shard_size=2**30)  # one shard holds them all
    (shard,) = (tmp_path / "one").glob(f"*.{'parquet' if fmt == 'parquet' else 'tar'}")
    if fmt == "parquet":  # row groups of 4 images
        pq.write_table(pq.read_table(shard), shard, row_group_size=4, compression="none")
        (tmp_path / "one" / "manifest.json").unlink()
    source = open_source(fmt, str(tmp_path / "one"))
    datasource = ImageDatasource(source, DataConfig(), View(SIZE, 0, None), skip_counter(), decoders=3)
    units = datasource.read_units(np.random.default_rng(0))
    assert len(units) >= 3 and len(source) == sum(expected(photos).values())
    assert sum(n for _, n in units) == len(source) if fmt == "parquet" else \
        all(len(u) == 4 and u[3] == len(source) for u, _ in units)  # byte ranges of one tar
    counts, rows = streamed(source)
    assert counts == expected(photos) and all(r["skipped"] == 0 for r in rows)


def epoch_streams(source, augment, batch: int = 4, seed: int = 0):
    """`EpochStreams` over `source`'s training lanes, read as the train loop reads them."""
    from pipelines.data.skips import skip_counter
    from pipelines.data.lanes import DTYPES, EpochStreams
    from pipelines.data.stream import training_stream
    data = DataConfig(decode_batch_size=batch, read_files_per_task=5)
    lanes = training_stream(source, data, SIZE, seed=seed, augment=augment)
    return lanes.key, EpochStreams(lanes.datasets, lanes.key, skip_counter(), plans=True, batch_size=batch,
                                   prefetch_batches=1,
                                   dtypes=DTYPES)


def test_the_next_epoch_decodes_while_this_one_is_read_each_with_its_own_order_and_counts(ray_client, photos,
                                                                                          tmp_path):
    """One epoch after another without a gap: once epoch e's first batch is out, epoch e+1's
    read tasks decode (while e is still open); every epoch gives every image exactly once, in
    an order of its own, and its own exact skip count; crops are new every epoch."""
    import time

    from pipelines.data.skips import epoch_counts, skip_counter
    counter = skip_counter()
    want = expected(photos)
    key, streams = epoch_streams(open_source("imagefolder", str(photos)), augment=None)
    orders = []
    for e in range(3):
        batches = streams.epoch(e, 0, e + 1)
        first = next(batches)
        deadline = time.monotonic() + 120
        while ray_client.get(counter.peek.remote(key, e + 1))["decoded"] == 0:
            assert time.monotonic() < deadline, f"epoch {e + 1} did not start while epoch {e} was open"
            time.sleep(0.05)
        rows = [first, *batches]
        order = [(int(label), hashlib.sha1(img.numpy().tobytes()).hexdigest())
                 for b in rows for label, img in zip(b["label"], b["image"])]
        assert collections.Counter(order) == want, e  # every image once: nothing of epoch e + 1 in it
        counts = epoch_counts(counter, key, e)
        assert (counts["skipped"], counts["decoded"]) == (0, sum(want.values())) and counts["decode_seconds"] > 0
        orders.append(order)
    streams.close()
    assert len({tuple(o) for o in orders}) == 3  # each epoch its own order

    root = tmp_path / "broken"
    shutil.copytree(photos, root)
    bad = add_broken_files(root)
    key, streams = epoch_streams(open_source("imagefolder", str(root)), augment=PRETRAIN)
    crops = []
    for e in range(2):
        rows = list(streams.epoch(e, 0, e + 1))
        assert sum(len(b["label"]) for b in rows) <= sum(want.values()) + bad
        assert epoch_counts(counter, key, e)["skipped"] == bad, e  # exact, every epoch
        crops.append({hashlib.sha1(img.numpy().tobytes()).hexdigest() for b in rows for img in b["image"]})
    streams.close()
    assert not crops[0] & crops[1]  # fresh crops every epoch


def test_the_seed_alone_gives_an_epochs_order_and_crops_and_a_resumed_epoch_decodes_only_the_rest(ray_client,
                                                                                                   photos):
    """Two streams of one seed give the same rows, in the same order with the same crops,
    whatever Ray's scheduling; another seed gives another order and other crops. An epoch
    resumed with the runs of positions already trained gives the same epoch: the trained
    images' rows are blank and were not decoded (the ledger's count), the others are the
    same crops at the same places."""
    from pipelines.data.lanes import merge_runs, runs_of
    from pipelines.data.skips import epoch_counts, skip_counter
    counter, total = skip_counter(), sum(expected(photos).values())

    def epoch(seed, e=0, first_iteration=0, trained=None):
        key, streams = epoch_streams(open_source("imagefolder", str(photos)), augment=PRETRAIN, seed=seed)
        rows = [(int(p), hashlib.sha1(img.numpy().tobytes()).hexdigest(), bool(img.any()))
                for b in streams.epoch(e, first_iteration, trained=trained)
                for p, img in zip(b["position"], b["image"])]
        streams.close()
        return rows, epoch_counts(counter, key, e)["decoded"]

    (a, decoded), (b, _), (other, _) = epoch(7), epoch(7), epoch(8)
    assert a == b and decoded == total and [p for p, _, _ in a] == list(range(total))
    assert len({h for _, h, _ in a} & {h for _, h, _ in other}) == 0  # other crops...
    assert [h for _, h, _ in epoch(8, e=1)[0]] != [h for _, h, _ in other]  # ...and each epoch its own
    trained = merge_runs(runs_of(range(0, 9)), runs_of(range(13, 21)))  # two workers, 9 + 8 images in
    resumed, decoded = epoch(7, first_iteration=2, trained=trained)
    assert decoded == total - 17
    assert [p for p, _, _ in resumed] == list(range(total))
    for (p, h, lit), (q, h0, _) in zip(resumed, a):
        assert p == q and (not lit if p < 9 or 13 <= p < 21 else h == h0), p


def test_each_steps_images_are_the_same_at_one_or_three_workers(ray_client, photos, tmp_path):
    """The training stream cut into blocks of train.batch_size rows (B = 2 here, with decoded
    batches of 5 and units of 7 files: neither a multiple), in the epoch's order, split as Ray
    Train splits it for its workers: worker w's micro-batch i is the epoch's rows
    [(i W + w) B, (i W + w + 1) B), so each optimizer step (12 images: 1 worker x accum 6, 3 x
    accum 2) trains the same images at any worker count, both ways the blocks are cut:
    ImageFolder's units at multiples of B; shards (WebDataset here, Parquet's the same way)
    re-cut across their units. (Two workers and one: test_pretrain_e2e.py's resized resume.)"""
    import threading

    from pipelines.data.lanes import DTYPES, EpochStreams
    from pipelines.data.skips import skip_counter
    from pipelines.data.stream import training_stream
    batch, step = 2, 12
    convert(str(photos), str(tmp_path / "webdataset"), "webdataset", shard_size=400 * 2**10)  # several shards
    data = DataConfig(decode_batch_size=5, read_files_per_task=7)
    for fmt in ("imagefolder", "webdataset"):
        source = open_source(fmt, str(photos if fmt == "imagefolder" else tmp_path / fmt))
        steps = {}
        for workers in (1, 3):
            lanes = training_stream(source, data, SIZE, seed=5, batch_size=batch)
            splits, ledger, trained = lanes.datasets[0].streaming_split(workers, equal=True), skip_counter(), {}

            def train(w):  # one worker's epoch 0; rank 0 plans it
                streams = EpochStreams([splits[w], None], lanes.key, ledger, plans=w == 0, batch_size=batch,
                                       drop_last=True, dtypes=DTYPES)
                trained[w] = [b["position"].tolist() for b in streams.epoch(0)]
            threads = [threading.Thread(target=train, args=(w,)) for w in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rows = [p for i in range(min(map(len, trained.values()))) for w in range(workers) for p in trained[w][i]]
            steps[workers] = [sorted(rows[k:k + step]) for k in range(0, len(source) // step * step, step)]
        assert len(steps[1]) == len(source) // step == 2, fmt
        assert steps[1] == steps[3], fmt


def test_a_cut_tar_read_in_byte_ranges_loses_only_its_rest_counted_exactly(ray_client, photos, tmp_path):
    """One tar (so split in byte ranges for the decoders), cut at 60% of its bytes, mid-member:
    every sample before the cut comes out once; the ledger counts the rest as skipped, exactly
    (no single range knows the tar's count), and says which tar fell short."""
    from pipelines.data.skips import epoch_counts, skip_counter
    manifest = convert(str(photos), str(tmp_path / "one"), "webdataset", shard_size=2**30)
    (tar,) = (tmp_path / "one").glob("*.tar")
    readable = sum(1 for _ in tar_samples(pafs.LocalFileSystem(), str(tar)))
    tar.write_bytes(tar.read_bytes()[:int(tar.stat().st_size * 0.6) // 512 * 512 + 100])
    left = sum(1 for data, _, _ in tar_samples(pafs.LocalFileSystem(), str(tar)) if data)
    assert readable == manifest["num_images"] and 0 < left < readable
    key, streams = epoch_streams(open_source("webdataset", str(tmp_path / "one")), augment=None)
    rows = [(int(label), hashlib.sha1(img.numpy().tobytes()).hexdigest()) for b in streams.epoch(0)
            for label, img, skipped in zip(b["label"], b["image"], b["skipped"]) if not skipped]
    streams.close()
    assert len(rows) == len(set(rows)) == left  # each image before the cut, once
    assert epoch_counts(skip_counter(), key, 0)["skipped"] == readable - left


@pytest.mark.slow  # a real kill of the ledger's process and Ray's restart of it
def test_the_skip_ledger_survives_its_process_a_lost_count_costs_a_warning(ray_client, photos, tmp_path, caplog):
    """The ledger's process killed in the middle of an epoch: Ray restarts it, the epochs open
    then report 0 with a warning (at once, not after the 60 s wait for missing reports), and
    the next epoch's count is exact again."""
    import logging
    import time

    from pipelines.data.skips import epoch_counts, skip_counter
    root = tmp_path / "broken"
    shutil.copytree(photos, root)
    bad = add_broken_files(root)
    counter = skip_counter()
    key, streams = epoch_streams(open_source("imagefolder", str(root)), augment=None)
    counts = []
    with caplog.at_level(logging.WARNING, logger="pipelines.data.skips"):
        for e in range(3):
            batches = streams.epoch(e, 0, e + 1)
            next(batches)
            if e == 0:  # a real kill of the actor's process; Ray restarts it
                ray_client.kill(counter.actor, no_restart=False)
            for _ in batches:
                pass
            t0 = time.monotonic()
            counts.append(epoch_counts(counter, key, e))
            assert time.monotonic() - t0 < 20
    streams.close()
    assert counts[0]["lost"] and counts[0]["skipped"] == 0
    assert "epoch 0: the skip ledger was restarted during the epoch" in caplog.text
    assert not counts[2]["lost"] and counts[2]["skipped"] == bad  # exact again
