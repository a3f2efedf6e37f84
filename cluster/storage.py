"""Run storage: a local/NFS folder or an S3-compatible bucket, through pyarrow filesystems.

Writes are whole-file and atomic: on a local filesystem a temporary file, fsynced, then a
rename (no temporary file is left behind when any step fails); on S3 an object appears
whole when its upload completes.
"""
import configparser
import errno
import logging
import os
import stat
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    return "://" in path


@dataclass
class Storage:
    """A folder on some filesystem; paths given to its methods are relative to it."""
    fs: pafs.FileSystem
    root: str  # path inside `fs` (no scheme)
    uri: str  # what the user wrote, for messages
    endpoint: str | None = None  # S3: the endpoint, region and credentials file it was opened with
    region: str | None = None
    credentials_file: str | None = None

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def child(self, rel: str) -> "Storage":
        return Storage(self.fs, self.path(rel), f"{self.uri.rstrip('/')}/{rel}", self.endpoint, self.region,
                       self.credentials_file)

    def write(self, rel: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the name points at them
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            folder = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)  # and the rename itself survives a crash
            finally:
                os.close(folder)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def upload(self, rel: str, local_path: str, chunk: int = 8 * 2**20) -> None:
        """Copy the local file `local_path` to `rel`, streamed. An S3 object appears only
        when its upload completes, and a failed upload raises (`pyarrow.fs.copy_files`
        logs it and returns)."""
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(local_path, "rb") as src, self.fs.open_output_stream(target) as out:
            while block := src.read(chunk):
                out.write(block)

    def sync(self, rel: str) -> None:
        """Make what another writer put at `rel` (a file, or a folder and its files: Ray
        Train's checkpoint upload) survive a crash of this machine: on a local filesystem,
        fsync its files and the folders that name them, up to this one. On S3 nothing is
        needed: an object is durable once its upload completes."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return
        target = self.path(rel)
        if not os.path.exists(target):
            return
        paths = [target]
        if os.path.isdir(target):
            paths = [os.path.join(d, n) for d, _, names in os.walk(target) for n in names] + [target]
        folder = os.path.dirname(target)
        while folder.startswith(self.root):
            paths.append(folder)
            folder = os.path.dirname(folder)
        for path in paths:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message names the file, never a value."""


def read_credentials(path: str, profile: str = "default") -> dict[str, str]:
    """The keys of an AWS shared-credentials file (INI: `[default]` with aws_access_key_id,
    aws_secret_access_key, optionally aws_session_token), as pyarrow's S3FileSystem takes
    them. The values are taken as strings, exactly as written. The file must be readable by
    its owner only (mode 600): a key others can read is a leaked key."""
    path = os.path.expanduser(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CredentialsError(f"{path}: no such credentials file") from None
    if mode & 0o077:
        raise CredentialsError(f"{path}: readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error:
        raise CredentialsError(f"{path}: not an AWS credentials file ([{profile}] with aws_access_key_id "
                               "and aws_secret_access_key)") from None
    if not parser.has_section(profile):
        raise CredentialsError(f"{path}: has no [{profile}] section")
    section = parser[profile]
    missing = [k for k in ("aws_access_key_id", "aws_secret_access_key") if not section.get(k)]
    if missing:
        raise CredentialsError(f"{path}: [{profile}] lacks {' and '.join(missing)}")
    keys = {"access_key": section["aws_access_key_id"], "secret_key": section["aws_secret_access_key"]}
    if section.get("aws_session_token"):
        keys["session_token"] = section["aws_session_token"]
    return keys


def s3_filesystem(endpoint: str | None = None, region: str | None = None,
                  credentials_file: str | None = None) -> pafs.S3FileSystem:
    """S3 or an S3-compatible store (MinIO, Ceph, moto): credentials from `credentials_file`
    (see `read_credentials`), else from the usual AWS environment variables / config files /
    instance role; `endpoint` e.g. http://127.0.0.1:9000."""
    kwargs = read_credentials(credentials_file) if credentials_file else {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def open_storage(uri: str, endpoint: str | None = None, region: str | None = None,
                 credentials_file: str | None = None) -> Storage:
    """`s3://bucket/prefix` or a local path (made absolute)."""
    if uri.startswith("s3://"):
        return Storage(s3_filesystem(endpoint, region, credentials_file), uri[len("s3://"):].rstrip("/"), uri,
                       endpoint, region, credentials_file)
    if is_uri(uri):
        raise ValueError(f"unsupported storage {uri!r}: use a local/NFS path or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(uri))
    return Storage(pafs.LocalFileSystem(), path, path)


# --------------------------------------------------------------------------------------
# Retrying storage
# --------------------------------------------------------------------------------------

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN,
                    errno.ESTALE}
PERMANENT_AWS = ("ACCESS_DENIED", "NO_SUCH", "INVALID", "SIGNATURE", "MISSING", "UNRECOGNIZED_CLIENT")


def transient(e: BaseException) -> bool:
    """A storage error that may pass: a lost connection or a timeout, an errno such as EIO or
    ESTALE, an S3 request error other than a refused or missing key. Not: a missing file, a
    refused permission, or bytes that do not parse (tarfile.ReadError, pyarrow's ArrowInvalid
    and its OSErrors without an errno, such as "Couldn't deserialize thrift"): reading them
    again gives the same bytes."""
    if not isinstance(e, OSError) or isinstance(e, PERMANENT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)) or e.errno in TRANSIENT_ERRNOS:
        return True
    message = str(e)
    return "AWS Error" in message and not any(code in message for code in PERMANENT_AWS)


@dataclass(frozen=True)
class Retry:
    """Retries of a transient storage error: up to `attempts` more tries, waiting `backoff`
    seconds before the first and twice as long before each next one, at most `max_wait`."""
    attempts: int = 3
    backoff: float = 0.5
    max_wait: float = float("inf")

    def call(self, fn, what: str, spent: int = 0):
        """`fn()`, tried again while it raises a transient error; `spent`: retries the same
        read has had already (a tar shard, read on after each retry, has one budget)."""
        for k in range(spent, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if not transient(e) or k == self.attempts:
                    raise
                wait = min(self.backoff * 2 ** k, self.max_wait)
                logger.warning("%s: %s; retry %d of %d in %.1f s", what, " ".join(str(e).split()), k + 1,
                               self.attempts, wait)
                time.sleep(wait)
