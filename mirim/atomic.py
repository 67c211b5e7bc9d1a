"""Writing files so that a crash never leaves half of one: a temp file beside the target, fsync, rename.
A reader sees the old file or the new one, never half. torch is imported only by save_atomic: the data
commands write through these too and need not pay for importing torch."""
import json
import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_file(path):
    """Open a temp file beside `path` for writing bytes; on success it is fsynced and renamed to
    `path`; on any error (a full disk, Ctrl-C) it is removed and the error goes on, so nothing
    half-written is left behind, and no temp file keeps the disk full."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def write_atomic(path, data):
    """Write bytes to path atomically."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + '\n').encode('utf-8'))


def save_atomic(obj, path):
    """torch.save obj to path atomically."""
    import torch
    with atomic_file(path) as f:
        torch.save(obj, f)


def fsync_dir(path):
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path or '.', os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_atomic(src, dst):
    """dst becomes the same file as src: a hard link (no second write of a big checkpoint), or a copy
    where the file system has no hard links; renamed into place, so also atomic."""
    tmp = f"{dst}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
