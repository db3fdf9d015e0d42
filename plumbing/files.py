"""Files that are never half-written, and failures told in one line. Knows nothing of DDPO.

Every file is written under a temporary name, flushed (fsync) and renamed, so a process that is killed or runs
out of disk leaves the previous version in place, never a half-written one.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def fail(message):
    """Stop with one clear line on stderr and a non-zero exit."""
    raise SystemExit(f"error: {message}")


class RunError(Exception):
    """A failure that ends a run: a reward that raises or returns NaN, non-finite numbers, a disk that is full.
    train() adds which epoch it was and where the last good checkpoint is."""


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def why(error):
    """An exception in one line: "TypeName: the first line of its message"."""
    return f"{type(error).__name__}: {first_line(error)}"


def fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its files were synced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(folder):
    """Yields folder.tmp to fill; on success its files are fsynced and it is renamed to folder (replacing an
    older one). On any failure, Ctrl-C included, the .tmp folder is removed and folder is left as it was."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # an unfinished one from a process that was killed
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for path in [*tmp.iterdir(), tmp]:
            fsync(path)  # on disk before the rename, so not even a power cut leaves a renamed but empty folder
        old = folder.with_name(folder.name + ".old")
        if folder.exists():  # set aside, not deleted, until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        fsync(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path` to write; renamed over `path` only once it is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # keeps the suffix: PIL and matplotlib read it
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text):
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def check_writable(folder):
    """Fails (OSError) unless `folder` exists as a writable folder or can be created: tried with a real file,
    since permission bits say nothing for root or a read-only mount. Creates nothing that stays."""
    folder = Path(folder).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is a file, not a folder")
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".ddpo-write-test")
    os.close(fd)
    os.unlink(probe)

