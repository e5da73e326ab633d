"""Files that must outlive a node: one set of functions for a local folder and for a URI (s3://, gs://, ...).

On a cluster, every output a later step needs (a run's summary, a checkpoint, a member folder, an ensemble spec)
lives under `run.storage_path`, usually `s3://bucket/...`; a local path works where every node shares the disk (one
machine, or an NFS mount). pyarrow's filesystems do the I/O, as they do for Ray Train's checkpoints and Ray Data, so
credentials and endpoints come from the same place (the node's role, `AWS_ENDPOINT_URL`, ...).

A path keeps its scheme everywhere it is passed on or printed: pyarrow and Ray hand back paths without it
(`bucket/runs/x`), which `uri_of` turns back into a URI.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for `scheme://...` (remote storage), False for a local path."""
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or a URI, and the path within it (absolute for a local path)."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a URI or a local path (a URI joins with '/', whatever the OS)."""
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def uri_of(filesystem: pafs.FileSystem, path: str, like: str | None = None) -> str:
    """A path that pyarrow or Ray gave back without its scheme, as a URI every node can read: `s3://` + path for S3,
    `gs://` for GCS, the plain path for a local filesystem; `like` (the storage URI it came from) wins otherwise."""
    if is_uri(path) or isinstance(filesystem, pafs.LocalFileSystem):
        return path
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(filesystem.type_name)
    if scheme is None and like and is_uri(like):
        scheme = like.split("://", 1)[0]
    if scheme is None:
        raise ValueError(f"no URI scheme known for a {filesystem.type_name} filesystem (path {path})")
    return f"{scheme}://{path.lstrip('/')}"


def exists(path: str) -> bool:
    filesystem, resolved = resolve(path)
    return filesystem.get_file_info(resolved).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    filesystem, resolved = resolve(path)
    return filesystem.get_file_info(resolved).type == pafs.FileType.Directory


def list_dir(path: str) -> list[str]:
    """Names (not paths) directly under folder `path`, sorted; [] when it does not exist."""
    filesystem, resolved = resolve(path)
    if filesystem.get_file_info(resolved).type != pafs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(resolved, recursive=False))
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def make_dirs(path: str) -> None:
    filesystem, resolved = resolve(path)
    filesystem.create_dir(resolved, recursive=True)


def read_bytes(path: str) -> bytes:
    """The whole file; FileNotFoundError names the path (with its scheme) when there is none."""
    filesystem, resolved = resolve(path)
    if filesystem.get_file_info(resolved).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {path}")
    with filesystem.open_input_stream(resolved) as stream:
        return stream.read()


def write_bytes(path: str, content: bytes) -> None:
    """Write a whole file, replacing any. A local file is written beside and renamed (never seen half-written); an
    object store's PUT is atomic already."""
    filesystem, resolved = resolve(path)
    parent = posixpath.dirname(resolved) if is_uri(path) else os.path.dirname(resolved)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    if isinstance(filesystem, pafs.LocalFileSystem):
        handle, temporary = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        os.replace(temporary, resolved)
        return
    with filesystem.open_output_stream(resolved) as stream:
        stream.write(content)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, default=float))


def open_input(path: str) -> io.BufferedIOBase:
    """A binary stream over a local file or an object (for pandas readers)."""
    filesystem, resolved = resolve(path)
    if filesystem.get_file_info(resolved).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {path}")
    return filesystem.open_input_file(resolved)


def upload_dir(local: str, target: str) -> None:
    """Copy local folder `local` to `target` (a local folder or a URI), replacing files of the same names."""
    if not is_uri(target):
        shutil.copytree(local, target, dirs_exist_ok=True)
        return
    filesystem, resolved = resolve(target)
    pafs.copy_files(local, resolved, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


def download_dir(source: str, local: str, skip: Callable[[str], bool] | None = None) -> str:
    """Copy folder `source` (a URI) to local folder `local`, leaving out the files whose path relative to `source`
    `skip` answers True for; returns `local`. A local `source` is returned as it is."""
    if not is_uri(source):
        return source
    filesystem, resolved = resolve(source)
    if filesystem.get_file_info(resolved).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such folder: {source}")
    os.makedirs(local, exist_ok=True)
    root = resolved.rstrip("/") + "/"
    for info in filesystem.get_file_info(pafs.FileSelector(resolved, recursive=True)):
        relative = info.path[len(root):]
        if info.type != pafs.FileType.File or (skip is not None and skip(relative)):
            continue
        target = os.path.join(local, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with filesystem.open_input_stream(info.path) as stream, open(target, "wb") as out:
            shutil.copyfileobj(stream, out, 8 << 20)
    return local


def delete_file(path: str) -> None:
    """Delete the file `path`; nothing when there is none."""
    filesystem, resolved = resolve(path)
    if filesystem.get_file_info(resolved).type == pafs.FileType.File:
        filesystem.delete_file(resolved)


def delete_dir(path: str) -> None:
    filesystem, resolved = resolve(path)
    if filesystem.get_file_info(resolved).type == pafs.FileType.Directory:
        filesystem.delete_dir(resolved)


def read_parquet(path: str) -> pd.DataFrame:
    """A parquet file as a frame; FileNotFoundError names the path when there is none."""
    return pd.read_parquet(io.BytesIO(read_bytes(path)))


def write_parquet(path: str, frame: pd.DataFrame) -> None:
    """`frame` as a parquet file (without its index), replacing any."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes(path, buffer.getvalue())


def read_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(read_bytes(path)))


def write_csv(path: str, frame: pd.DataFrame) -> None:
    """`frame` as a CSV file (without its index), replacing any."""
    write_text(path, frame.to_csv(index=False))


def absolute(path: str) -> str:
    """A URI as it is, a local path made absolute (Ray's storage_path takes either, not a relative path)."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))
