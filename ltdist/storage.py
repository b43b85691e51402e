"""Local paths and object-store URLs behind one small set of file operations.

Data, labels, training and evaluation all read and write through here, so it is a base module
(standard library only; fsspec on first use of a URL).

A location is a local path, a ``file://`` URL or any fsspec URL (``s3://``, ``gs://``, ...).
Writes are atomic: a local file is written under a temporary name, fsync'd and renamed; an
object-store object is uploaded in one PUT, which object stores make visible whole or not at all.
A folder tree (a checkpoint) is copied file by file with ``upload_tree`` / ``download_tree``.

A WebDataset-style ``pipe:command`` URL runs a shell command, so it is read only where the caller
says the URL is trusted (``allow_pipe=True``): locations come from manifests, split files,
indexes and configs, which are data, and data is never code.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from ltdist.entry import UserError


class UntrustedLocationError(UserError, ValueError):
    """A location that would run a program, met where only data may come from."""


def runs_program(location: str) -> bool:
    """True for a location that would execute a command when opened (``pipe:``)."""
    return location.lstrip().lower().startswith("pipe:")


def is_local(location: str) -> bool:
    scheme = urlparse(location).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(location: str) -> str:
    return urlparse(location).path if location.startswith("file://") else location


def join(base: str, *names: str) -> str:
    if is_local(base):
        return os.path.join(local_path(base), *names)
    return "/".join([base.rstrip("/"), *names])


def _fs(location: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    # fsspec caches directory listings per (cached) instance and answers exists/info/size
    # from them: another process's write or delete would go unseen. Ask the store afresh.
    fs.invalidate_cache(path)
    return fs, path


def exists(location: str) -> bool:
    if is_local(location):
        return os.path.exists(local_path(location))
    fs, path = _fs(location)
    return fs.exists(path)


def makedirs(location: str) -> None:
    if is_local(location):
        os.makedirs(local_path(location), exist_ok=True)
    # Object stores have no folders: nothing to make.


def listdir(location: str) -> list[str]:
    """Base names of the entries in a folder (empty when the folder does not exist)."""
    if is_local(location):
        path = local_path(location)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = _fs(location)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def remove(location: str) -> None:
    if is_local(location):
        try:
            os.remove(local_path(location))
        except FileNotFoundError:
            pass
    else:
        fs, path = _fs(location)
        if fs.exists(path):
            fs.rm(path)


def remove_tree(location: str) -> None:
    """Remove a folder and everything under it (a prefix on object stores); absent is fine."""
    if is_local(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
    else:
        fs, path = _fs(location)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def read_bytes(location: str, *, allow_pipe: bool = False) -> bytes:
    with open_read(location, allow_pipe=allow_pipe) as f:
        return f.read()


def open_read(location: str, *, allow_pipe: bool = False) -> IO[bytes]:
    """A binary stream; with ``allow_pipe``, ``pipe:cmd`` runs ``cmd`` and reads its output."""
    if runs_program(location):
        if not allow_pipe:
            raise UntrustedLocationError(
                f"refusing to open {location[:200]!r}: a 'pipe:' location runs a shell command. "
                "Locations read from manifests, split files, indexes and configs are data; "
                "read a trusted shard URL with read_shard(url, allow_pipe=True)"
            )
        # A shell command, as in WebDataset (``pipe:curl -s URL | zcat``); a pipeline's status
        # is that of its last command.
        cmd = location.lstrip()[5:]
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)
        return _PipeReader(proc)
    if is_local(location):
        return open(local_path(location), "rb")
    fs, path = _fs(location)
    return fs.open(path, "rb")


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old file or the whole new one, never a part.

    Locally the temporary is ``<dest>.tmp-<pid>`` beside the destination (a killed writer
    leaves it where a rerun finds it, not in the system's temp folder); an object store gets
    one PUT of the bytes.
    """
    if is_local(location):
        dest = local_path(location)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_dir(os.path.dirname(os.path.abspath(dest)))
    else:
        fs, path = _fs(location)
        fs.pipe_file(path, data)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine is running (a temporary's writer may still be)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def put_file_atomic(local_file: str, location: str) -> None:
    """Move (local) or upload (object store) a finished local file to ``location`` atomically."""
    if is_local(location):
        dest = local_path(location)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}"
        with open(local_file, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, dest)
        _fsync_dir(os.path.dirname(os.path.abspath(dest)))
    else:
        fs, path = _fs(location)
        fs.put_file(local_file, path)


def upload_tree(local_dir: str | Path, location: str) -> None:
    """Put every file under ``local_dir`` to the same relative name under ``location``, each
    atomically (a reader needs another marker, such as a checkpoint's COMPLETE, for the tree)."""
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        put_file_atomic(str(path), join(location, *path.relative_to(local_dir).parts))


def download_tree(location: str, local_dir: str | Path) -> None:
    """Copy every file under the folder ``location`` to the same relative name in ``local_dir``."""
    local_dir = Path(local_dir)
    fs, root = _fs(location)
    root = root.rstrip("/")
    for remote in fs.find(root):
        target = local_dir / remote[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(target))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PipeReader(io.RawIOBase):
    """Standard output of a ``pipe:`` command; a failing command is an error, not a short read."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0:
            rc = self.proc.wait()
            if rc != 0:
                raise OSError(f"pipe command {self.proc.args} exited with status {rc}")
        return n

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            self.proc.wait()
        super().close()
