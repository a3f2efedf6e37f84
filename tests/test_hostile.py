"""What real datasets and clusters throw at a run, with real crafted files, a real S3 server
behind a real TCP proxy that drops connections, and real processes: each is skipped and
counted, retried, refused or survived, as README's "What a run survives" says."""
import io
import json
import logging
import os
import socket
import struct
import tarfile
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.storage import open_storage
from pipelines.common.config import ConfigError, load_config
from pipelines.data.reading import Retry, imagefolder_samples, parquet_samples, tar_samples, transient
from pipelines.data.stream import decode_batch

FAST = Retry(attempts=3, backoff=0.2)


# --------------------------------------------------------------------------------------
# Crafted files
# --------------------------------------------------------------------------------------


def jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def claims(data: bytes, height: int, width: int) -> bytes:
    """A real JPEG whose SOF0 header claims another size (the bytes stay a few KB)."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def png_claiming(side: int) -> bytes:
    """A real PNG whose IHDR claims side x side (its IDAT holds only a few rows)."""
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side * 3 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def write_tar(path, samples: list[tuple[str, bytes | None, int]]) -> list[int]:
    """A WebDataset tar of (key, jpg bytes, label); returns each member header's offset."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label in samples:
            for ext, body in (("jpg", data), ("cls", str(label).encode())):
                offsets.append(tar.fileobj.tell())
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return offsets


def good_samples(n: int, first: int = 0) -> list[tuple[str, bytes, int]]:
    return [(f"s{first + i:04d}", jpeg(first + i), (first + i) % 3) for i in range(n)]


# --------------------------------------------------------------------------------------
# Stand-ins in place; exact counts
# --------------------------------------------------------------------------------------


def test_stand_ins_take_the_broken_images_place(caplog):
    blobs = [b"garbage", jpeg(1), None, jpeg(2), claims(jpeg(3), 65500, 65500), png_claiming(15000)]
    labels = [0, 1, 2, 3, 4, 5]
    with caplog.at_level(logging.WARNING):
        out = decode_batch(blobs, labels, [f"img{i}" for i in range(6)], 16)
    assert out["image"].shape == (6, 16, 16, 3)
    assert out["skipped"].tolist() == [1, 0, 1, 0, 1, 1]
    assert out["label"].tolist()[1::2][:2] == [1, 3] and set(out["label"][[0, 2, 4, 5]].tolist()) <= {1, 3}
    assert "img4" in caplog.text and "max_pixels" in caplog.text and "img2" not in caplog.text  # None: reader logged


# --------------------------------------------------------------------------------------
# Damaged shards
# --------------------------------------------------------------------------------------


def read_all(samples) -> tuple[int, int]:
    items = list(samples)
    return sum(d is not None for d, _, _ in items), sum(d is None for d, _, _ in items)


def test_tar_cut_mid_member_or_at_a_header_loses_only_the_rest_counted(tmp_path, caplog):
    fs = pafs.LocalFileSystem()
    offsets = write_tar(tmp_path / "full.tar", good_samples(10))
    whole = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "mid.tar").write_bytes(whole[:offsets[12] + 512 + 100])  # inside sample 6's jpg
    (tmp_path / "header.tar").write_bytes(whole[:offsets[14]])  # right before sample 7's first header
    with caplog.at_level(logging.WARNING):
        assert read_all(tar_samples(fs, str(tmp_path / "full.tar"), expected=10)) == (10, 0)
        assert read_all(tar_samples(fs, str(tmp_path / "mid.tar"), expected=10, retry=FAST)) == (6, 4)
        assert read_all(tar_samples(fs, str(tmp_path / "header.tar"), expected=10, retry=FAST)) == (7, 3)
    assert "skipping 4 images of" in caplog.text and "mid.tar: unreadable after 6 samples" in caplog.text
    assert "header.tar: ends after 7 of the 10 samples" in caplog.text
    assert "retry" not in caplog.text  # a damaged file is read once: retrying reads the same bytes


def test_tar_member_over_the_byte_limit_is_skipped_unread(tmp_path):
    samples = good_samples(4)
    samples[2] = ("big", bytes(200_000), 0)
    write_tar(tmp_path / "s.tar", samples)
    out = list(tar_samples(pafs.LocalFileSystem(), str(tmp_path / "s.tar"), expected=4, max_bytes=100_000))
    assert [d is None for d, _, _ in out] == [False, False, True, False]


def test_parquet_damaged_row_group_and_footer(tmp_path, caplog):
    fs = pafs.LocalFileSystem()
    images = [jpeg(i) for i in range(40)]
    table = pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                      "label": list(range(40))})
    path = tmp_path / "s.parquet"
    pq.write_table(table, path, row_group_size=10, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(2).column(0)
    raw = bytearray(path.read_bytes())
    start = column.data_page_offset
    raw[start:start + 64] = b"\xff" * 64  # row group 2's page header no longer parses
    (tmp_path / "bad.parquet").write_bytes(bytes(raw))
    (tmp_path / "footer.parquet").write_bytes(bytes(raw[:-100]))
    with caplog.at_level(logging.WARNING):
        assert read_all(parquet_samples(fs, str(path), 8, expected=40)) == (40, 0)
        assert read_all(parquet_samples(fs, str(tmp_path / "bad.parquet"), 8, expected=40, retry=FAST)) == (30, 10)
        assert read_all(parquet_samples(fs, str(tmp_path / "footer.parquet"), 8, expected=40, retry=FAST)) == (0, 40)
        # the second of two parts (row groups 2-3) of the damaged shard
        assert read_all(parquet_samples(fs, str(tmp_path / "bad.parquet"), 8, 1, 2, expected=20, retry=FAST)) \
            == (10, 10)
    assert "bad.parquet row group 2: cannot read it" in caplog.text
    assert "skipping 40 images of" in caplog.text and "footer.parquet" in caplog.text
    assert "retry" not in caplog.text


def test_parquet_shards_of_another_schema_are_named_before_the_run(tmp_path):
    from pipelines.data.reading import DataError, open_source
    pq.write_table(pa.table({"image": [b"x"] * 4, "label": [0] * 4}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet has no `image` column of struct<bytes: binary> "
                                        r"\(its columns: image: binary, label: int64\)"):
        open_source("parquet", str(tmp_path))
    pq.write_table(pa.table({"image": [{"bytes": b"x"}] * 4, "cls": ["a"] * 4}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no integer `label` column"):
        open_source("parquet", str(tmp_path))


def test_a_file_gone_since_the_listing_is_lost_without_retries(tmp_path, caplog):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        open(paths[-1], "wb").write(jpeg(i))
    os.unlink(paths[1])  # deleted after the epoch's listing
    with caplog.at_level(logging.WARNING):
        out = list(imagefolder_samples(pafs.LocalFileSystem(), paths, [0, 1, 2], retry=Retry(3, 5.0)))
    assert [d is None for d, _, _ in out] == [False, True, False]
    assert "retry" not in caplog.text and "1.jpg: cannot read it" in caplog.text  # a missing file stays missing


class FlakyProxy:
    """A real TCP proxy on 127.0.0.1 in front of the S3 server; while `down`, it accepts and
    at once closes every connection, as a dropped link or a restarting load balancer does."""

    def __init__(self, target_port: int):
        self.target, self.down_until = target_port, 0.0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def down(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def _serve(self):
        while True:
            client, _ = self.sock.accept()
            if time.monotonic() < self.down_until:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # RST
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def flaky_s3(s3_server):
    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    return proxy, f"http://127.0.0.1:{proxy.port}"


def test_transient_s3_errors_are_retried_with_backoff_then_skipped(s3_server, flaky_s3, tmp_path, caplog):
    proxy, endpoint = flaky_s3
    prefix = f"runs/flaky-{uuid.uuid4().hex[:8]}"
    write_tar(tmp_path / "s.tar", good_samples(6))
    store = open_storage(f"s3://{prefix}", s3_server)
    store.write("s.tar", (tmp_path / "s.tar").read_bytes())
    fs = open_storage(f"s3://{prefix}", endpoint).fs
    shard = f"{prefix}/s.tar"
    proxy.down(3.0)  # longer than the S3 client's own retries (about 2 s); ours, after 0.2, 0.4, 0.8 s, get through
    with caplog.at_level(logging.WARNING):
        assert read_all(tar_samples(fs, shard, expected=6, retry=FAST)) == (6, 0)
    assert "retry 1 of 3" in caplog.text
    caplog.clear()
    proxy.down(30.0)  # down for longer than the retries wait: the shard is lost, counted
    try:
        with caplog.at_level(logging.WARNING):
            t0 = time.monotonic()
            assert read_all(tar_samples(fs, shard, expected=6, retry=Retry(2, 0.1))) == (0, 6)
        assert time.monotonic() - t0 < 25  # bounded: two retries, then given up
        assert "retry 2 of 2" in caplog.text and "skipping 6 images of" in caplog.text
    finally:
        proxy.down(0)


def test_which_errors_are_transient():
    assert transient(ConnectionResetError()) and transient(OSError(5, "Input/output error"))
    assert transient(OSError("When reading 'x': AWS Error NETWORK_CONNECTION during GetObject operation"))
    assert not transient(FileNotFoundError()) and not transient(PermissionError())
    assert not transient(OSError("Couldn't deserialize thrift: TProtocolException: Invalid data"))
    assert not transient(tarfile.ReadError("unexpected end of data")) and not transient(ValueError())


# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["data.s3_secret_key=[abc!", "data.s3_access_key=0755", "run.secret_key=x0x",
                                      "data.aws_secret_access_key=!!"])
def test_credentials_on_the_command_line_are_refused_without_echo(tmp_path, override):
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", [f"data.path={tmp_path}", override])
    message = str(e.value)
    value = override.split("=", 1)[1]
    assert value not in message and "\n" not in message
    assert "s3_credentials_file" in message and "AWS_ACCESS_KEY_ID" in message


def test_credentials_file_must_be_private_and_is_read_as_strings(tmp_path):
    from cluster.storage import read_credentials
    path = tmp_path / "creds"
    path.write_text("[default]\naws_access_key_id = 0755\naws_secret_access_key = [not-yaml: !x %(y)s\n")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=r"data.s3_credentials_file: .*readable by others \(mode 644\); chmod 600"):
        load_config("configs/debug.yaml", [f"data.path={tmp_path}", f"data.s3_credentials_file={path}"])
    os.chmod(path, 0o600)
    load_config("configs/debug.yaml", [f"data.path={tmp_path}", f"data.s3_credentials_file={path}"])
    assert read_credentials(str(path)) == {"access_key": "0755", "secret_key": "[not-yaml: !x %(y)s"}
    path.write_text("[default]\naws_access_key_id = a\n")
    with pytest.raises(ConfigError, match="lacks aws_secret_access_key"):
        load_config("configs/debug.yaml", [f"data.path={tmp_path}", f"run.s3_credentials_file={path}"])


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def hostile_shards(folder) -> int:
    """Two WebDataset shards and their manifest: 70 samples with broken images at the start,
    the middle and the end (garbage, a JPEG and a PNG claiming 65500x65500 and 15000x15000)
    and the four format bombs of `crafted.FORMAT_BOMBS` (a TIFF, an ICO, an ICNS and an AVIF
    whose headers claim less than they decode to) among them, and one shard counted 30 but cut
    off mid-member after 12. Returns how many images an epoch skips."""
    from crafted import FORMAT_BOMBS
    folder.mkdir(parents=True)
    samples = good_samples(70)
    samples[0] = (samples[0][0], b"not an image at all", 0)
    samples[35] = (samples[35][0], claims(jpeg(35), 65500, 65500), 1)
    samples[69] = (samples[69][0], png_claiming(15000), 2)
    for i, make in enumerate(FORMAT_BOMBS.values()):
        samples[10 + 7 * i] = (samples[10 + 7 * i][0], make(), 0)
    write_tar(folder / "a.tar", samples)
    offsets = write_tar(folder / "b.tar", good_samples(30, first=100))
    whole = (folder / "b.tar").read_bytes()
    (folder / "b.tar").write_bytes(whole[:offsets[24] + 512 + 50])  # inside sample 12's jpg
    manifest = {"shards": [{"path": "a.tar", "num_images": 70}, {"path": "b.tar", "num_images": 30}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return 3 + len(FORMAT_BOMBS) + 18


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["every image broken", "shards of another schema"])
def test_a_data_error_retrying_cannot_fix_ends_the_run_once(ray_cluster, tmp_path, damage):
    from conftest import read_jsonl, run_pretrain
    data = tmp_path / "data"
    data.mkdir()
    if damage == "every image broken":
        write_tar(data / "a.tar", [(f"k{i}", b"\xff\xd8 not really" * 10, 0) for i in range(80)])
        fmt, message = "webdataset", "too few images for one step"
    else:  # the first shard (whose schema is checked before the run) is right, the second is not
        good = [{"bytes": jpeg(i), "path": f"{i}.jpg"} for i in range(40)]
        pq.write_table(pa.table({"image": good, "label": [0] * 40}), data / "a.parquet")
        pq.write_table(pa.table({"image": [b"x" * 10] * 40, "label": [0] * 40}), data / "b.parquet")
        fmt, message = "parquet", "b.parquet"
    result = run_pretrain(f"data.format={fmt}", f"data.path={data}", f"run.storage_path={tmp_path}", "run.name=bad",
                          "train.epochs=2", "optim.warmup_epochs=0.5", "train.batch_size=16", "run.max_failures=-1",
                          "scaling.num_workers=1")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "bad" / "attempts.jsonl")) == 1  # ended once, not retried forever


def all_text_under(root) -> bytes:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                out.append(open(os.path.join(dirpath, name), "rb").read())
            except OSError:
                pass
    return b"\n".join(out)


@pytest.mark.slow
def test_hostile_data_on_s3_is_counted_exactly_every_epoch_and_no_credential_is_anywhere(
        ray_cluster, s3_server, tmp_path):
    """One run submitted as a job (`ray job submit`), its data and its run directory on S3
    with a known secret in their credentials file, with --verbose (the console shows
    everything Ray's processes print, so the secret is looked for there too):
    - hostile data (bombs, format bombs, garbage and a truncated shard): the run goes on, and
      each epoch counts exactly the images it could not use, wherever they fell (the last,
      dropped batch included);
    - the secret is in no run file, no checkpoint, no log, and not in the dashboard's Jobs,
      Train, tasks or actors state APIs, nor `ray job list`."""
    import subprocess
    import urllib.request

    from conftest import RAY, ROOT
    _, dashboard = ray_cluster
    secret = f"Sekr3t-{uuid.uuid4().hex}"
    creds = tmp_path / "creds"
    creds.write_text(f"[default]\naws_access_key_id = AKIA{uuid.uuid4().hex[:12].upper()}\n"
                     f"aws_secret_access_key = {secret}\n")
    os.chmod(creds, 0o600)
    prefix = f"runs/secret-{uuid.uuid4().hex[:8]}"
    skipped = hostile_shards(tmp_path / "data")
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", force_virtual_addressing=False)
    for shard in sorted((tmp_path / "data").iterdir()):
        with fs.open_output_stream(f"{prefix}/data/{shard.name}") as f:
            f.write(shard.read_bytes())
    cmd = [RAY, "job", "submit", f"--address={dashboard}", f"--working-dir={ROOT}", "--",
           "RAY_TRAIN_ENABLE_STATE_TRACKING=1", "python",  # the dashboard's Train view, as operators turn it on
           "pipelines/pretrain.py", "--config", "configs/debug.yaml", "data.format=webdataset",
           f"data.path=s3://{prefix}/data", f"data.s3_endpoint={s3_server}", f"data.s3_credentials_file={creds}",
           "data.decode_batch_size=16", f"run.storage_path=s3://{prefix}/runs", f"run.s3_endpoint={s3_server}",
           f"run.s3_credentials_file={creds}", "run.name=secret", "train.epochs=2", "optim.warmup_epochs=0.5",
           "train.batch_size=16", "scaling.num_workers=1", "run.max_failures=-1", "--verbose"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr  # --verbose: everything Ray prints, as Ray does by default
    assert "(RayTrainWorker pid=" in out and "epoch 0 done: train_loss" in out
    assert "100 training images" in out  # as the manifest counts them

    def run_file(name: str) -> str:
        with fs.open_input_stream(f"{prefix}/runs/secret/{name}") as f:
            return f.read().decode()
    metrics = [json.loads(line) for line in run_file("metrics.jsonl").splitlines()]
    assert [m["skipped_images"] for m in metrics] == [skipped, skipped]
    assert [m["decoded_images"] for m in metrics] == [100, 100]  # every sample the shards promised
    # stand-ins take the broken images' places; the 18 lost with the cut shard are gone: 82 images, 5 steps
    assert all(m["decode_images_per_cpu_sec"] > 0 and m["steps"] == (100 - 18) // 16 for m in metrics), metrics
    assert len(run_file("attempts.jsonl").splitlines()) == 1  # nothing restarted

    seen = [result.stdout.encode(), result.stderr.encode()]
    run_files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/runs", recursive=True))
                 if i.type == pafs.FileType.File]
    assert any(p.endswith("checkpoint.pth") for p in run_files) and any(p.endswith("config.yaml") for p in run_files)
    assert f"{prefix}/runs/secret/reconstructions/epoch_0000.png" in run_files
    for path in run_files:
        with fs.open_input_stream(path) as f:
            seen.append(f.read())
    apis = {}
    for api in ("/api/jobs/", "/api/train/v2/runs/v1", "/api/v0/tasks?limit=10000", "/api/v0/actors?limit=10000"):
        with urllib.request.urlopen(dashboard + api, timeout=30) as r:
            apis[api] = r.read()
    assert b'"secret"' in apis["/api/train/v2/runs/v1"]  # Train state tracking is on, and has this run
    seen += apis.values()
    seen.append(subprocess.run([RAY, "job", "list", f"--address={dashboard}"], capture_output=True).stdout)
    seen.append(all_text_under(os.environ["MAE_TEST_RAY_TEMP_DIR"]))  # every log of the cluster
    for blob in seen:
        assert secret.encode() not in blob


# --------------------------------------------------------------------------------------
# One writer per run
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_submission_of_a_live_run_stops_at_once_and_a_dead_ones_lease_is_taken_over(
        ray_cluster, digits, tmp_path):
    """A second submission of a live run stops within a quarter of the lease's ttl, naming the
    live driver. Then another driver takes the lease over (as one that judged it stale would):
    the first driver stops its run within a renewal, exit 1, naming the new holder, and neither
    it nor rank 0 writes the run directory again. The new holder never renews (it is gone):
    a third submission takes its lease over after watching it unchanged for its ttl."""
    import re

    from conftest import read_jsonl, run_pretrain, wait_for
    run = tmp_path / "one"
    args = (f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=one", "run.lease_ttl_seconds=12",
            "scaling.num_workers=1")  # the lease is the driver's: one worker is enough
    # epochs enough that only the takeover ends it (20 ended by themselves once, under load,
    # before the second submission's driver had started)
    first = run_pretrain(*args, "train.epochs=1000", wait=False)
    lines = []
    threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True).start()  # never a full pipe
    try:
        wait_for(lambda: (run / "attempts.jsonl").exists(), 300, "the first run's workers")
        config = (run / "config.yaml").stat().st_mtime_ns
        t0 = time.monotonic()
        second = run_pretrain(*args, "train.epochs=1000", timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: run directory {run} is in use by the driver of Ray job \w+ \(pid {first.pid} "
                            rf"on host .*, cluster .*\), its lease renewed while this process watched it; stop it "
                            rf"with `kill {first.pid}` on .*, or wait for it to end", last), last
        assert time.monotonic() - t0 < 60  # at once: before any cluster resource is asked for
        assert (run / "config.yaml").stat().st_mtime_ns == config  # the second wrote nothing
        assert len(read_jsonl(run / "attempts.jsonl")) == 1

        taker = {"job_id": None, "submission_id": None, "cluster": None, "host": "elsewhere", "pid": 4242,
                 "acquired": time.time(), "renewed": time.time(), "ttl": 4.0, "token": "the-new-holder"}
        (run / "lease.json.tmp").write_text(json.dumps(taker))
        os.replace(run / "lease.json.tmp", run / "lease.json")
        taken = time.monotonic()
        first.wait(timeout=120)
        stopped = time.monotonic()
    finally:
        first.kill()
        first.wait()
    time.sleep(0.5)  # the reader thread takes the last lines
    out = "".join(lines)
    assert first.returncode == 1, out[-3000:]
    assert (f"error: lost the lease of run directory {run}: it is now held by process pid 4242 on host elsewhere; "
            "this driver stopped the run, which wrote nothing after it learned") in out, out[-3000:]
    assert stopped - taken < 12 / 4 + 60  # a renewal finds it, then Ray Train's abort
    written = {p: p.stat().st_mtime for p in run.rglob("*") if p.is_file()}
    assert json.loads((run / "lease.json").read_text())["token"] == "the-new-holder"  # not given back: not ours
    epochs = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    assert len(epochs) < 1000 and len(read_jsonl(run / "attempts.jsonl")) == 1  # stopped, not restarted
    time.sleep(3)
    assert {p: p.stat().st_mtime for p in run.rglob("*") if p.is_file()} == written  # nothing straggles in

    third = run_pretrain(*args, "train.epochs=1", "optim.warmup_epochs=0.5", timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "taking over" in third.stderr.lower() and "pid 4242 on host elsewhere" in third.stderr, third.stderr[-2000:]
    assert not (run / "lease.json").exists()  # given back at the end
