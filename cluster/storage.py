"""Run storage: a local/NFS folder or an S3-compatible bucket, through pyarrow filesystems.

Writes are whole-file and atomic: on a local filesystem a temporary file, fsynced, then a
rename (no temporary file is left behind when any step fails); on S3 an object appears
whole when its upload completes.
"""
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


@dataclass
class Storage:
    """A folder on some filesystem; paths given to its methods are relative to it."""
    fs: pafs.FileSystem
    root: str  # path inside `fs` (no scheme)
    uri: str  # what the user wrote, for messages

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def child(self, rel: str) -> "Storage":
        return Storage(self.fs, self.path(rel), f"{self.uri.rstrip('/')}/{rel}")

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

    def read(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None


def s3_filesystem(endpoint: str | None = None, region: str | None = None, access_key: str | None = None,
                  secret_key: str | None = None) -> pafs.S3FileSystem:
    """S3 or an S3-compatible store (MinIO, Ceph, moto): credentials given, else from the
    usual AWS environment variables / config files; `endpoint` e.g. http://127.0.0.1:9000."""
    kwargs = {}
    if access_key:
        kwargs.update(access_key=access_key, secret_key=secret_key)
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def open_storage(uri: str, endpoint: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None) -> Storage:
    """`s3://bucket/prefix` or a local path (made absolute)."""
    if uri.startswith("s3://"):
        return Storage(s3_filesystem(endpoint, region, access_key, secret_key), uri[len("s3://"):].rstrip("/"), uri)
    if is_uri(uri):
        raise ValueError(f"unsupported storage {uri!r}: use a local/NFS path or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(uri))
    return Storage(pafs.LocalFileSystem(), path, path)
