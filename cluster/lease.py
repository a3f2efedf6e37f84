"""One writer per run: the driver that writes a run directory holds its lease, `<run dir>/lease.json`.

The holder renews the lease every ttl/4 seconds from a daemon thread (`keep_alive`, or `with`).
No two machines' clocks are compared:
- A reader judges a lease by watching it: one whose version (its ETag, or its bytes) stays the
  same for a whole ttl of the reader's own monotonic clock belongs to a holder that is gone
  (driver killed, node lost) and is taken over with a warning; one that changes meanwhile is
  live, and the reader gets `LeaseHeld`, one line naming the holder and how to stop it.
- A holder that has not renewed for 3/4 of the ttl by its own monotonic clock (its writes
  failing: EIO, S3 5xx, an expired token) counts its lease as lost before any reader could take
  it over, as does one that finds another's token in lease.json; `on_lost` callbacks then run.

Every change of lease.json is a compare-and-swap, so that of processes racing for it exactly one
wins: on S3 a conditional put (If-None-Match: * creates, If-Match: <etag> renews, takes over or
releases: a release is a conditional put of a released record, never a DELETE), on a local/NFS
folder the claim scheme of `_swap`. An S3 store that ignores the conditions is found at acquire
by a probe object, and refused unless the caller accepts the risk (`unsafe_store`).
"""
import hashlib
import json
import logging
import math
import os
import random
import secrets
import socket
import sys
import threading
import time
import uuid

import boto3
import pyarrow.fs as pafs
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from cluster.storage import Storage, read_credentials

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
HOLDER_FIELDS = ("job_id", "submission_id", "cluster", "host", "pid")
CONTENTION_S = 2.0  # how long acquire retries while other processes are changing the lease at that moment
MARGIN = 0.25  # of the ttl: a holder counts its lease lost this long before a reader may take it over

# Ray's job supervisor gives a `ray job submit` entrypoint its job config as JSON in this variable;
# the config's metadata carries the submission id under "job_submission_id" (Ray 2.60:
# dashboard/modules/job/job_supervisor.py, `_get_driver_env_vars`; the key is common.py's
# JOB_ID_METADATA_KEY). Ray has no public API for the submission id: RuntimeContext has the job id.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class LeaseHeld(RuntimeError):
    """A live holder has the run directory's lease; the message names it and how to stop it."""

    def __init__(self, where: str, record: dict, how: str = "renewed while this process watched it"):
        self.record = record
        super().__init__(f"run directory {where} is in use by {describe(record)}, its lease {how}; stop it with "
                         f"{how_to_stop(record)}, or wait for it to end")


class LeaseLost(RuntimeError):
    """Our lease was taken over, removed, or not renewed for too long: stop writing the run."""


class UnsafeStore(RuntimeError):
    """An S3 store that ignores conditional writes: two drivers could both hold a lease there."""


def describe(record: dict) -> str:
    """The holder in words: `Ray job raysubmit_x (driver pid 12 on host h, cluster 10.0.0.1:6379)`."""
    where = f"pid {record.get('pid')} on host {record.get('host')}"
    if record.get("cluster"):
        where += f", cluster {record['cluster']}"
    if record.get("submission_id"):
        return f"Ray job {record['submission_id']} (driver {where})"
    if record.get("job_id"):
        return f"the driver of Ray job {record['job_id']} ({where})"
    return f"process {where}"


def how_to_stop(record: dict) -> str:
    if record.get("submission_id"):
        return f"`ray job stop {record['submission_id']}`"
    return f"`kill {record.get('pid')}` on {record.get('host')}"


def submission_id() -> str | None:
    """The submission id of the `ray job submit` entrypoint this process is, else None."""
    try:
        metadata = json.loads(os.environ[RAY_JOB_CONFIG_ENV])["metadata"]
        return str(metadata["job_submission_id"])
    except (KeyError, TypeError, ValueError):
        return None


def holder_info() -> dict:
    """This process as a lease holder: Ray job id and GCS address (None unless Ray is initialised),
    submission id (None unless started by `ray job submit`), host name and pid."""
    job_id = cluster = None
    ray = sys.modules.get("ray")  # not imported: not initialised (importing it to ask takes seconds)
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        job_id, cluster = context.get_job_id(), context.gcs_address
    return {"job_id": job_id, "submission_id": submission_id(), "cluster": cluster, "host": socket.gethostname(),
            "pid": os.getpid()}


def parse(data: bytes) -> dict | None:
    """The lease record in `data`, or None when it is not one (then the lease counts as stale)."""
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("token"), str):
        return None
    for key in ("renewed", "ttl"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
    return record


def is_stale(record: dict) -> bool:
    """For a claim file (`_swap`) only: a claim lives for the moment of one change, never
    renewed, so its age is judged by the clocks (a stale claim only costs a retry)."""
    return time.time() - record["renewed"] > record["ttl"]


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


class _Claimed(Exception):
    """Another process is changing the lease right now (`record` is its claim, see `_swap`)."""

    def __init__(self, record: dict):
        super().__init__(describe(record))
        self.record = record


class Lease:
    """A held lease. `acquire` takes it; `keep_alive()` (or `with`) renews it until `release()`."""

    def __init__(self, storage: Storage, record: dict, file: "_LocalFile | _S3Object", version, confirmed: float,
                 clock=time.time):
        self.storage = storage
        self.record = record  # what lease.json holds: HOLDER_FIELDS, acquired, renewed, ttl, token
        self.lost: str | None = None  # why the lease was lost, once known
        self._file = file
        self._version = version  # of what we last wrote: its bytes (local) or its ETag (S3)
        self._confirmed = confirmed  # monotonic time at which our last successful write was sent
        self._clock = clock  # the `acquired` and `renewed` times written (for people; never compared)
        self._lock = threading.Lock()  # renewals (keep_alive's thread) against release
        self._lost_lock = threading.Lock()
        self._on_lost: list = []
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    @property
    def ttl(self) -> float:
        return self.record["ttl"]

    @property
    def token(self) -> str:
        return self.record["token"]

    @property
    def expires(self) -> float:
        """The monotonic time after which this holder counts its lease as lost, unless renewed:
        3/4 of the ttl after its last successful write was sent, before any reader (who starts
        its ttl of watching after that write) may take it over."""
        return self._confirmed + self.ttl * (1 - MARGIN)

    @classmethod
    def acquire(cls, storage: Storage, holder: dict | None = None, ttl: float = 60.0, unsafe_store: bool = False,
                clock=time.time) -> "Lease":
        """Take the run directory's lease for `holder` (default: this process, `holder_info()`).
        A lease there is watched: raise LeaseHeld as soon as it changes (its holder renews it:
        within a quarter of its ttl), take it over once it has not changed for its whole ttl; a
        released or unreadable one is taken at once (unreadable: after a ttl too). On S3, a store
        that ignores conditional writes raises UnsafeStore unless `unsafe_store`."""
        if not 0 < ttl < math.inf:
            raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
        holder = holder_info() if holder is None else holder
        holder = {key: holder.get(key) for key in HOLDER_FIELDS}  # nothing else reaches the file
        file = _LocalFile(storage) if isinstance(storage.fs, pafs.LocalFileSystem) else _S3Object(storage)
        if isinstance(file, _S3Object):
            file.check_conditions(unsafe_store)
        token = secrets.token_hex(16)
        deadline = time.monotonic() + CONTENTION_S
        watched = None  # (version, monotonic time first seen) of another holder's lease
        warned = None
        while True:
            now = clock()
            record = {**holder, "acquired": now, "renewed": now, "ttl": ttl, "token": token}
            data, version = file.read()
            current = None if data is None else parse(data)
            blocker = current
            sent = time.monotonic()
            try:
                if data is None:
                    new_version = file.create(_encode(record))
                elif current is not None and current["token"] == token:
                    return cls(storage, current, file, version, sent, clock)  # a write of ours had landed after all
                elif current is not None and current.get("released"):
                    new_version = file.replace(version, _encode(record))
                else:
                    if watched is not None and watched[0] != version and current is not None:
                        raise LeaseHeld(storage.uri, current)  # it changed while we watched: its holder is live
                    if watched is None or watched[0] != version:
                        watched = (version, sent)
                    patience = current["ttl"] if current is not None else ttl
                    if sent - watched[1] < patience:
                        time.sleep(min(patience / 8, 1.0, patience - (sent - watched[1])))
                        deadline = time.monotonic() + CONTENTION_S
                        continue
                    if data != warned:
                        logger.warning(_takeover_message(storage.uri, current, data, patience))
                        warned = data
                    sent = time.monotonic()
                    new_version = file.replace(version, _encode(record))
            except _Claimed as e:
                new_version, blocker = None, e.record
            if new_version is not None:
                return cls(storage, record, file, new_version, sent, clock)
            if time.monotonic() > deadline:  # others kept changing it: say who last had it
                if blocker is None:
                    raise RuntimeError(f"could not take the lease of {storage.uri}: it kept changing for "
                                       f"{CONTENTION_S:g} s")
                raise LeaseHeld(storage.uri, blocker, "kept changing while this process tried to take it")
            time.sleep(random.uniform(0.01, 0.05))

    def on_lost(self, callback) -> None:
        """Call `callback(why)` once, from the renewing thread, when the lease is lost (at once
        when it already is)."""
        with self._lost_lock:
            self._on_lost.append(callback)
            why = self.lost
        if why is not None:
            callback(why)

    def renew(self) -> None:
        """Write a fresh `renewed` time; raise LeaseLost when the lease is no longer ours, or
        has gone unrenewed past `expires`."""
        with self._lock:
            if self._released:
                raise RuntimeError(f"the lease of {self.storage.uri} was released")
            if self.lost:
                raise LeaseLost(self.lost)
            self._check_expiry()
            record = {**self.record, "renewed": self._clock()}
            for _ in range(3):
                sent = time.monotonic()
                try:
                    version = self._file.replace(self._version, _encode(record))
                except _Claimed as e:  # a taker judged our lease stale and is replacing it: see next tick
                    raise RuntimeError(f"the lease of {self.storage.uri} is being changed by {e}") from None
                if version is not None:
                    self.record, self._version, self._confirmed = record, version, sent
                    return
                self._version = self._check_ours()  # e.g. our last write landed but reported failure
            raise RuntimeError(f"the lease of {self.storage.uri} kept changing while renewing it")

    def keep_alive(self) -> "Lease":
        """Renew from a daemon thread every ttl/4 seconds (ttl/16 after a failed renewal) until
        released, and count the lease lost at `expires` even while a renewal hangs; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_until_released, daemon=True,
                                            name=f"lease-{self.token[:8]}")
            self._thread.start()
            threading.Thread(target=self._watch_expiry, daemon=True, name=f"lease-expiry-{self.token[:8]}").start()
        return self

    def release(self) -> None:
        """Stop renewing and mark the lease released if it is still ours (best effort: failures
        are logged; a lease left behind is taken over a ttl after its last renewal). Never
        removes a lease that is not ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            released, self._released = self._released, True
            if released or self.lost:
                return
            claimant = _encode({**self.record, "renewed": self._clock()})
            tombstone = _encode({**self.record, "renewed": self._clock(), "released": True})
            try:
                for _ in range(3):
                    if self._file.release(self._version, claimant, tombstone):
                        return
                    self._version = self._check_ours()
            except LeaseLost as e:
                logger.warning("%s; left in place", e)
            except Exception as e:  # the run is over either way
                logger.warning("could not release the lease of %s (%s: %s); it is taken over a ttl (%g s) after "
                               "its last renewal", self.storage.uri, type(e).__name__, e, self.ttl)

    def __enter__(self) -> "Lease":
        return self.keep_alive()

    def __exit__(self, *exc) -> None:
        self.release()

    def _check_ours(self):
        """The version of lease.json when it still holds our token; else raise LeaseLost."""
        data, version = self._file.read()
        current = None if data is None else parse(data)
        if current is not None and current["token"] == self.token and not current.get("released"):
            return version
        now = ("removed" if data is None else "unreadable" if current is None else
               f"held by {describe(current)}")
        raise LeaseLost(f"lost the lease of run directory {self.storage.uri}: it is now {now}")

    def _check_expiry(self) -> None:
        """Raise LeaseLost past `expires`: naming the new holder where one can be read already."""
        late = time.monotonic() - self._confirmed
        if late < self.ttl * (1 - MARGIN):
            return
        try:
            self._check_ours()
        except LeaseLost:
            raise
        except Exception:  # the store does not answer: say what we know
            pass
        error = f"; last error: {self._last_error}" if self._last_error else ""
        raise LeaseLost(f"lost the lease of run directory {self.storage.uri}: not renewed for {late:.1f} s "
                        f"(ttl {self.ttl:g} s), so another driver may take it over{error}")

    def _declare_lost(self, why: str) -> None:
        with self._lost_lock:
            if self.lost is not None or self._released:
                return
            # said before `lost` is set: whoever sees the lease lost can read why in the log
            logger.error("%s; stopped renewing it: this process must stop writing the run", why)
            self.lost = why
            callbacks = list(self._on_lost)
        for callback in callbacks:
            try:
                callback(why)
            except Exception:
                logger.exception("a callback on the loss of the lease of %s failed", self.storage.uri)

    def _watch_expiry(self) -> None:
        while not self._stop.wait(max(0.0, self.expires - time.monotonic())):
            if self.lost is not None:
                return
            try:
                self._check_expiry()
            except LeaseLost as e:
                self._declare_lost(str(e))
                return

    def _renew_until_released(self) -> None:
        interval = self.ttl / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
                self._last_error, interval = None, self.ttl / 4
            except LeaseLost as e:
                self._declare_lost(str(e))
                return
            except Exception as e:  # storage hiccups: retried sooner, until `expires`
                if self._stop.is_set():
                    return
                self._last_error, interval = f"{type(e).__name__}: {e}", self.ttl / 16
                logger.warning("renewing the lease of %s failed (%s); retrying in %.1f s", self.storage.uri,
                               self._last_error, interval)


def _takeover_message(where: str, old: dict | None, data: bytes, watched: float) -> str:
    if old is None:
        return (f"taking over the lease of run directory {where}: its {LEASE_FILE} ({len(data)} bytes) is not a "
                f"lease, so its holder cannot be named")
    return (f"taking over the lease of run directory {where} from {describe(old)}: not renewed while this "
            f"process watched it for {watched:g} s, its ttl (the holder is gone: killed, or its node lost)")


# A local/NFS folder. Each store reads (data, version), creates, replaces a version, deletes one;
# a lost race returns None/False, and the caller reads again.

class _LocalFile:
    def __init__(self, storage: Storage):
        os.makedirs(storage.root, exist_ok=True)
        self.path = f"{storage.root}/{LEASE_FILE}"

    def read(self) -> tuple[bytes | None, bytes | None]:
        data = _read(self.path)
        return data, data

    def create(self, body: bytes) -> bytes | None:
        return body if _link_new(self.path, body) else None

    def replace(self, version: bytes, body: bytes) -> bytes | None:
        return body if _swap(self.path, version, body, body) else None

    def release(self, version: bytes, claimant: bytes, tombstone: bytes) -> bool:
        return _swap(self.path, version, None, claimant)  # a delete, as sure as a swap: under a claim


# A folder has no compare-and-swap, but link(2) fails atomically when its target exists (on NFS
# too, where O_EXCL was long unreliable), and a linked file appears whole, never half written.
# - Create: write a temporary file, fsync, link it as lease.json; EEXIST: someone else was first.
# - Change content C (renew, take over, release): link a claim file `lease.json.claim-<sha256(C)>`.
#   Everyone changing C claims the same name, so one at a time; the claimant re-reads lease.json
#   and, still C, replaces or deletes it, then removes its claim. So lease.json only ever changes
#   from C by the holder of C's claim, and it never vanishes while a lease exists. (Renaming a
#   stale lease aside instead leaves a moment without one, in which a third process creates a
#   lease while the second puts back a fresh one it moved by mistake: two winners.)
# - A claim holds its claimant's lease record. One not renewed within its ttl was left by a process
#   that died mid-change; it is removed the same way (a claim on the claim).

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_temp(path: str, body: bytes) -> str:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before a name points at them
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(path: str) -> None:
    folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _link_new(path: str, body: bytes) -> bool:
    """Create `path` holding `body`, whole; False when it exists."""
    tmp = _write_temp(path, body)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _fsync_dir(path)
    return True


def claim_path(path: str, expected: bytes) -> str:
    return f"{path}.claim-{hashlib.sha256(expected).hexdigest()[:32]}"


def _swap(path: str, expected: bytes, new: bytes | None, claimant: bytes) -> bool:
    """Replace `path` by `new` (None: delete it) if it holds exactly `expected`; False when it does
    not, raise _Claimed when another live process is changing it. `claimant`: our lease record."""
    claim = claim_path(path, expected)
    if not _link_new(claim, claimant):
        _remove_dead_claim(claim, claimant)
        return False
    try:
        if _read(path) != expected:
            return False
        if new is None:
            os.unlink(path)
        else:
            tmp = _write_temp(path, new)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        _fsync_dir(path)
        return True
    finally:
        os.unlink(claim)


def _remove_dead_claim(claim: str, claimant: bytes) -> None:
    held = _read(claim)
    if held is None:
        return  # its claimant just finished
    record = parse(held)
    if record is not None and not is_stale(record):
        raise _Claimed(record)
    logger.warning("removing %s, left by %s, which died while changing the lease", claim,
                   "an unknown process" if record is None else describe(record))
    _swap(claim, held, None, claimant)


# S3 (or S3-compatible): conditional writes make every change a compare-and-swap on the ETag.

class _S3Object:
    def __init__(self, storage: Storage):
        if not isinstance(storage.fs, pafs.S3FileSystem):
            raise ValueError(f"{storage.uri}: a lease needs a local/NFS folder or s3://bucket/prefix")
        self.bucket, _, prefix = storage.root.partition("/")
        self.key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        keys = read_credentials(storage.credentials_file) if storage.credentials_file else {}
        # None credentials: boto3's default chain (environment, config files, instance role). A
        # session of its own: creating clients from boto3's shared default one is not thread-safe.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=storage.endpoint, region_name=storage.region,
            aws_access_key_id=keys.get("access_key"), aws_secret_access_key=keys.get("secret_key"),
            aws_session_token=keys.get("session_token"),
            config=BotoConfig(s3={"addressing_style": "path"} if storage.endpoint else None, connect_timeout=5,
                              read_timeout=10, retries={"mode": "standard", "max_attempts": 3}))

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None, None
            raise
        return response["Body"].read(), response["ETag"]

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def replace(self, version: str, body: bytes) -> str | None:
        return self._put(body, IfMatch=version)

    def release(self, version: str, claimant: bytes, tombstone: bytes) -> bool:
        """A conditional put of the released record: a store may accept a DELETE and ignore its
        If-Match (and delete a successor's lease); the put's condition is the one `check_conditions`
        verified."""
        return self._put(tombstone, IfMatch=version) is not None

    def check_conditions(self, unsafe_store: bool) -> None:
        """Probe the store with an object of our own beside the lease: a second
        `If-None-Match: *` put must be refused, as must an `If-Match` put on a wrong ETag or on a
        missing key. Raise UnsafeStore naming what it ignored, or warn when `unsafe_store`."""
        probe = f"{self.key}.probe-{secrets.token_hex(8)}"
        ignored = []
        try:
            etag = self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe", IfNoneMatch="*")["ETag"]
            for what, key, condition in (("If-None-Match: *", probe, {"IfNoneMatch": "*"}),
                                         ("If-Match on another ETag", probe, {"IfMatch": f'"{"0" * 32}"'}),
                                         ("If-Match on a missing key", probe + "-missing", {"IfMatch": etag})):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"probe", **condition)
                    ignored.append(what)
                except ClientError as e:
                    if not _lost_race(e):
                        raise
        finally:
            for key in (probe, probe + "-missing"):
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=key)
                except ClientError:
                    pass
        if not ignored:
            return
        store = self.client.meta.endpoint_url
        message = (f"the S3 store at {store} ignores {', '.join(ignored)} on PutObject: two drivers of the run could "
                   f"both hold its lease and write it together")
        if not unsafe_store:
            raise UnsafeStore(f"run.storage_path: {message}; use a store with conditional writes (AWS S3, MinIO "
                              f"from 2024-05), or set run.lease_without_conditional_writes=true to accept that risk")
        logger.warning("%s (run.lease_without_conditional_writes=true)", message)

    def _put(self, body: bytes, **condition) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition)["ETag"]
        except ClientError as e:
            if _lost_race(e):
                return None
            raise


def _lost_race(e: ClientError) -> bool:
    """412 PreconditionFailed, 409 ConditionalRequestConflict (a concurrent conditional write), or
    404 (an If-Match on an object since deleted): someone else changed the lease first."""
    return (e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")
            or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412, 404))
