"""Files that survive a crash: atomic writes of a file and of a folder, fsync, a run lock, and reading JSON.

Every save in minipeft goes through here, so that a reader (or a run resumed after kill -9) finds the old version
or the new one, whole, never half of either, and so that nothing a user put in a folder is ever deleted.

- write_file(path, write): write(tmp) fills a temporary sibling, which is fsynced and renamed over path (a rename
  within one folder is atomic), then the folder is fsynced so that the rename itself is on disk.
- replace_dir(path): a context manager yielding a new, empty sibling folder to fill; on success it becomes path.
  POSIX cannot rename a folder over a non-empty one, so it takes two renames: path -> <path>.old, new -> path,
  then <path>.old is removed. A crash between the two leaves <path>.old, complete; `existing_dir(path)` (what
  readers call) finds it there, and the next replace_dir puts it back first. Entries of the old folder that the
  new one does not write (a user's README, other adapters) are carried into the new folder as hard links before
  the swap (keep_others=True): no user file is deleted, and nothing is copied.
- run_lock(folder): an exclusive lock held while a run writes into a folder (released by the OS if the process
  dies, even by kill -9).
- read_json(path): FileNotFoundError if missing; ValueError naming the file if it is not UTF-8 JSON, or not the
  expected top-level type.
"""

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path


def fsync(path):
    """A file's bytes, or a folder's entries, are on disk when this returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_sibling(path, kind):
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_file(path, write):
    """Call write(tmp_path), then rename tmp over path: a reader sees the old file or the new one, whole."""
    path = Path(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text):
    write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj, indent=2):
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def aside(path):  # where replace_dir keeps the previous folder for a moment
    return Path(path).with_name(Path(path).name + ".old")


def existing_dir(path):
    """path, or <path>.old when a save was interrupted between its two renames (the previous folder, whole)."""
    path = Path(path)
    return aside(path) if not path.exists() and aside(path).is_dir() else path


def _link_tree(src, dst):  # src's entries appear under dst too: hard links, no bytes copied
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link)
    else:
        _link(src, dst)


def _link(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: copy instead
        shutil.copy2(src, dst)


@contextlib.contextmanager
def replace_dir(path, keep_others=True, drop=()):
    """Yield a new folder beside `path` to fill; on success it becomes `path` (see the module docstring).
    Entries of the old folder matching a glob pattern in `drop` are not carried over (a model save drops the old
    weight shards it supersedes). A symlink at `path` is followed: the folder it points to is replaced."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    old = aside(path)
    if not path.exists() and old.is_dir():  # an earlier save stopped between its renames: put it back first
        os.rename(old, path)
    for stale in path.parent.glob(f".{path.name}.new-*"):  # what killed saves left behind
        shutil.rmtree(stale, ignore_errors=True)
    new = _tmp_sibling(path, "new")
    new.mkdir()
    try:
        yield new
        if keep_others and path.is_dir():
            for entry in path.iterdir():
                if any(entry.match(pattern) for pattern in drop):
                    continue
                if not (new / entry.name).exists() and not (new / entry.name).is_symlink():
                    _link_tree(entry, new / entry.name)
        for f in [*new.rglob("*"), new]:  # on disk before the renames make them visible
            if not f.is_symlink():
                fsync(f)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # the previous folder was never touched
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # path is whole, so a leftover .old is stale
        os.rename(path, old)  # 1. the previous folder steps aside, still complete
    os.rename(new, path)  # 2. the new one takes its name
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


_LOCKED = set()  # folders this process holds the lock of (run_lock is re-entrant: the CLI and train() both take it)


@contextlib.contextmanager
def run_lock(folder):
    """Hold an exclusive lock on <folder>/.lock; a second run on the same folder gets a clear error at once."""
    folder = Path(os.path.realpath(folder))
    if folder in _LOCKED:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; runs are not protected from each other
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FileExistsError(f"{folder} is in use by another run ({f.read().strip() or 'pid unknown'})") from None
        f.seek(0), f.truncate(), f.write(f"pid {os.getpid()}\n"), f.flush()
        _LOCKED.add(folder)
        try:
            yield
        finally:
            _LOCKED.discard(folder)
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path, expect=None):
    """The parsed file; expect=dict (or list) also checks the top-level type. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if expect is not None and not isinstance(obj, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise ValueError(f"{path}: expected a JSON {kind}, got {json.dumps(obj)[:40]}")
    return obj
