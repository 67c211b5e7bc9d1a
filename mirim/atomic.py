"""Writing files so that a crash never leaves half of one: a temp file beside the target, fsync, rename.
A reader sees the old file or the new one, never half. torch is imported only by save_atomic: the data
commands write through these too and need not pay for importing torch.

And the one rule of every command that writes (claim_file, claim_folder): it never replaces a file it
did not write in this run unless told to (--overwrite). train.py, dpo.py and classify.py keep their run
folders by mirim/out_dir.claim_out_dir."""
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
    remove_stale_temps(path)
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


def remove_stale_temps(path):
    """Remove the temp files of `path` (path.tmpPID) that a process killed mid-write left (kill -9, power loss): a
    full-size copy nothing else removes. Only those of processes no longer running: another writer's stays."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for other in names:
        pid = other[len(name) + 4:] if other.startswith(name + '.tmp') else ''
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            try:
                os.remove(os.path.join(folder, other))
            except OSError:
                pass


def process_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # running, another user's
        return True
    return True


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
    remove_stale_temps(dst)
    tmp = f"{dst}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# -----------------------------------------------------------------------------
# the rule: a command never replaces a file it did not write in this run unless told to (--overwrite)

# files that make a folder another command's result, never a folder to export into, even with --overwrite
OTHER_RESULTS = {'ckpt.pt': 'a training run', 'best.pt': 'a training run', 'log.jsonl': 'a training run',
                 'classifier.pt': 'a training run', 'reference.pt': 'a training run',
                 'meta.json': 'a prepared data set'}


def listing(names):
    """'a, b, c and 2 more'"""
    return ', '.join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else '')


def claim_file(path, overwrite, option):
    """Before a command writes the file `path` (its --output): refused (ValueError, one line naming the
    file and --overwrite) when something is already there and not overwrite, or when it could not be
    written there (a folder, a parent that is a file, no permission): tried with the temp name
    write_atomic uses. Call it before the work, so that a refusal costs nothing."""
    if os.path.isdir(path):
        raise ValueError(f"{option}={path} is a directory: name a file in it")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path} already exists: pass --overwrite to replace it, or choose another {option}")
    probe = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(probe, 'wb').close()
        os.remove(probe)
    except OSError as e:
        why = e.strerror
        if isinstance(e, (FileExistsError, NotADirectoryError)):  # name the file that stands where a folder must
            parent = os.path.dirname(os.path.abspath(path))
            while parent != os.path.dirname(parent) and not os.path.lexists(parent):
                parent = os.path.dirname(parent)
            why = f"{parent} is not a directory"
        raise ValueError(f"cannot write {path}: {why}; choose another {option}") from None


def claim_folder(folder, ours, overwrite, what, option, keep=(), refuse=None):
    """Before a command fills the folder `folder` (export's --dest, a data set's --out): -> the names
    of its files already in it, for the command to remove before it writes, so that nothing of an
    earlier result stays beside the new one (a tokenizer.model of another model). ours(name) says which
    files are the command's (those it writes, and those an earlier run of it may have left); every other
    file is never touched. keep: files of ours that already hold what this run writes (they stay).
    Refused (ValueError, one line) when files of ours are there and not overwrite, and, even with
    overwrite, when the folder holds any file of `refuse` ({name: what it marks}), another command's
    result that a write there would spoil (a training run, a data set). A missing folder holds nothing;
    an unreadable one raises its OSError; a file (or anything but a folder) in its place is refused."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{option} {folder} is a file, not a folder: choose a folder for {what} (a new one, or "
                         f"one it wrote before)")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    theirs = [name for name in names if name in (refuse or {})]
    if theirs:
        kinds = ' and '.join(dict.fromkeys(refuse[name] for name in theirs))
        raise ValueError(f"{folder} holds {kinds} ({listing(theirs)}), not {what}: writing there would spoil "
                         f"it, and --overwrite replaces only {what}; choose another {option}")
    old = [name for name in names if ours(name) and name not in keep]
    if old and not overwrite:
        raise ValueError(f"{folder} already holds {what} or part of one ({listing(old)}); "
                         f"pass --overwrite to replace it, or choose another {option}")
    return old
