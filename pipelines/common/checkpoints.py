"""Where a checkpoint is, and reading it, on a local/NFS path or S3 (cluster/storage.py): a
checkpoint file (ours or an official MAE .pth) is itself, a run directory of ours is its latest
checkpoint. The commands (export, evaluate, visualize), the driver and the workers all find
checkpoints here; their names and how a file is deserialised are mae/checkpoint.py's, which
cannot do this itself since mae/ knows nothing of the run storage.
"""
import argparse
import io

import pyarrow.fs as pafs

from cluster.storage import Storage, open_storage
from mae.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE, load_checkpoint


def locate_checkpoint(uri: str, endpoint: str | None = None, region: str | None = None,
                      credentials_file: str | None = None, what: str = "--checkpoint") -> tuple[Storage, str]:
    """(storage, name of the file in it) of the checkpoint `uri` names: `uri` itself when it is
    a file, else the latest `checkpoint_epoch_*_step_*/checkpoint.pth` of the run directory
    `uri`. The S3 settings are `open_storage`'s. A FileNotFoundError says what is missing,
    after `what`: the option or config key that named `uri`."""
    store = open_storage(uri, endpoint, region, credentials_file)
    info = store.fs.get_file_info(store.root)
    if info.type == pafs.FileType.Directory:
        return store, latest_in(store, what)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{what}: no such checkpoint file or run directory {uri!r}")
    root, _, name = store.root.rpartition("/")
    # its folder on the filesystem already open: no second S3 client, and right for a file at `/`
    folder = Storage(store.fs, root, store.uri.rstrip("/").rpartition("/")[0], store.endpoint, store.region,
                     store.credentials_file)
    return folder, name


def latest_in(run: Storage, what: str = "--checkpoint") -> str:
    """`checkpoint_epoch_*_step_*/checkpoint.pth` of the run directory's latest checkpoint.
    Ordered by (epoch, step), not by name, so that a number outgrowing its padding still sorts
    last; a folder without the file (an upload under way, or one being pruned) is passed over."""
    found = sorted((tuple(map(int, m.groups())), i.base_name)
                   for i in run.fs.get_file_info(pafs.FileSelector(run.root))
                   if (m := CHECKPOINT_DIR.fullmatch(i.base_name)))
    for _, folder in reversed(found):
        name = f"{folder}/{CHECKPOINT_FILE}"
        if run.fs.get_file_info(run.path(name)).type == pafs.FileType.File:
            return name
    raise FileNotFoundError(f"{what}: the folder {run.uri!r} holds no checkpoint_epoch_*_step_*/{CHECKPOINT_FILE}")


def read_checkpoint(uri: str, endpoint: str | None = None, region: str | None = None,
                    credentials_file: str | None = None, what: str = "--checkpoint") -> dict:
    """The checkpoint dict `locate_checkpoint` finds, loaded by `mae.checkpoint.load_checkpoint`
    (tensors and its allow-listed types only: loading never executes code from the file)."""
    store, name = locate_checkpoint(uri, endpoint, region, credentials_file, what)
    try:
        if isinstance(store.fs, pafs.LocalFileSystem):
            return load_checkpoint(store.path(name))  # torch reads a file as it goes: no copy of all of it in memory
        data = store.read(name)
    except FileNotFoundError:
        data = None
    if data is None:  # deleted since it was found: pruned by the run that wrote it
        raise FileNotFoundError(f"{what}: {store.child(name).uri} is gone")
    return load_checkpoint(io.BytesIO(data))


def add_checkpoint_options(ap: argparse.ArgumentParser, what: str) -> None:
    """A command's --checkpoint (`what`: what it may name) and the S3 settings it is read
    with (`add_s3_options`)."""
    ap.add_argument("--checkpoint", required=True, help=f"{what}; a local path or s3://bucket/prefix")
    add_s3_options(ap, "--checkpoint")


def add_s3_options(ap: argparse.ArgumentParser, what: str) -> None:
    """The S3 settings a command reads `what` with. Keys never go on a command line: they
    come from a credentials file or the usual AWS environment."""
    ap.add_argument("--s3-endpoint", help=f"{what} on an S3-compatible store (MinIO, Ceph): its URL, "
                                          "e.g. http://127.0.0.1:9000")
    ap.add_argument("--s3-region", help=f"{what} on S3: the bucket's region")
    ap.add_argument("--s3-credentials-file",
                    help=f"{what} on S3: an AWS shared-credentials file, mode 600 ([default] with "
                         "aws_access_key_id and aws_secret_access_key); default: the AWS environment variables, "
                         "config files or instance role")
