"""Guarding DST: nothing outside it is ever written, and it holds one run's files.

- SRC and DST are compared by (st_dev, st_ino), not by path, so a DST that reaches into SRC through a
  symbolic link or a bind mount is refused like a plain subfolder.
- One run at a time: ``DST/.shardconv.lock`` is held with ``flock`` for the whole run. The kernel
  drops the lock with the process, so a crashed run never leaves DST locked.
- ``--overwrite`` empties DST first (only a DST that looks like a checkpoint output, so that a
  mistyped DST such as a home folder is never wiped); a resumed DST is pruned to the run's own file
  names. Either way no file of another model survives, and no symbolic link is left to write through.
- Extra files copied from SRC are checked before anything is written: regular files only (never
  opened before ``stat`` says so: a FIFO would block), and their total size is capped.

Torch-free, so the command line can use it before torch is imported.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import DestinationError, ShardconvError, SourceError
from .files import INDEX_NAME, create_fresh, other_files

LOCK_NAME = ".shardconv.lock"
JOURNAL_NAME = ".shardconv-journal.json"  # journal.NAME (journal.py imports torch)
DEFAULT_MAX_EXTRA = 2**30  # total bytes of SRC's other files (tokenizer, code, ...): far above any real repo's
COPY_CHUNK = 8 * 2**20


def human(n: int) -> str:
    """Bytes as a short decimal size: ``1.23 GB``."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _identity(path: Path, follow: bool = True) -> tuple[int, int] | None:
    """(device, inode) of ``path`` (of the link itself with ``follow=False``), None if it cannot be read."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _src_folders(src: Path) -> dict[tuple[int, int], Path]:
    """Every folder of SRC by identity, and the targets of its links to folders (not followed further)."""
    found = {}
    for dirpath, dirnames, _ in os.walk(src, followlinks=False):
        for d in [dirpath, *(os.path.join(dirpath, n) for n in dirnames)]:
            ident = _identity(Path(d))
            if ident is not None:
                found.setdefault(ident, Path(d))
    return found


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is SRC, inside SRC or contains it (by identity), that is not a folder, or that
    holds files of something else. Reads only."""
    src, dst = Path(src), Path(dst)
    if os.path.lexists(dst) and not dst.exists():
        raise DestinationError(f"{dst}: is a symbolic link to {os.readlink(dst)}, which does not exist")
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a folder")
    probe = nearest_existing(dst)
    if not probe.is_dir():
        raise DestinationError(f"{probe}: exists and is not a folder, so DST {dst} cannot be made in it")
    inside = _src_folders(Path(os.path.realpath(src)))
    real = Path(os.path.realpath(probe))
    for folder in [real, *real.parents]:
        hit = inside.get(_identity(folder))
        if hit is not None:
            where = "" if str(folder) == str(hit) else f" ({folder} is {hit})"
            raise DestinationError(f"{dst}: DST is inside SRC {src}{where}; SRC is only ever read")
    if dst.exists():
        mine = _identity(real)
        src_real = Path(os.path.realpath(src))
        for folder in src_real.parents:
            if _identity(folder) == mine:
                raise DestinationError(f"{dst}: DST contains SRC {src}; choose an empty folder")
        check_contents(dst, overwrite)


def is_empty(dst: Path) -> bool:
    """No entry but a lock file (a run killed before its journal leaves only that)."""
    return not any(name != LOCK_NAME for name in os.listdir(dst))


def _has(dst: Path, name: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(dst / name).st_mode)
    except OSError:
        return False


def looks_like_output(dst: Path) -> bool:
    """A shardconv journal, or a ``config.json`` beside an index or a ``*.safetensors``: a
    checkpoint, which ``--overwrite`` may replace."""
    if _has(dst, JOURNAL_NAME):
        return True
    return _has(dst, "config.json") and (_has(dst, INDEX_NAME) or any(
        name.endswith(".safetensors") for name in os.listdir(dst)))


def check_contents(dst: Path, overwrite: bool) -> None:
    """A DST with files must hold a resumable run (the caller compares journals) or, with
    ``--overwrite``, look like a checkpoint output."""
    from .journal import Journal

    if is_empty(dst):
        return
    if not overwrite:
        if Journal.read(dst) is None:
            raise DestinationError(f"{dst}: not empty (use --overwrite to replace a previous output)")
    elif not looks_like_output(dst):
        raise DestinationError(f"{dst}: not empty and not a checkpoint (no {JOURNAL_NAME}, no config.json with "
                             "*.safetensors): --overwrite only replaces a previous output; empty it yourself "
                             "or choose another folder")


class DstLock:
    """``DST/.shardconv.lock`` held with ``flock(LOCK_EX | LOCK_NB)``: a second run is refused at once.

    The file is removed on release. A run that opened it just before its removal would lock a file
    that is gone, so a lock counts only when the file at the name is still the one locked.
    """

    def __init__(self, dst: Path, name: str = LOCK_NAME):
        self.dst = Path(dst)
        self.path = self.dst / name  # another name: a rank of a distributed run (distributed.py)
        self.fd = -1

    def acquire(self) -> "DstLock":
        for _ in range(100):
            try:
                st = os.lstat(self.path)
                if not stat.S_ISREG(st.st_mode):  # a link or anything else planted there: never opened
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EEXIST):
                    continue  # replaced between lstat and open: look again
                raise DestinationError(f"{self.path}: cannot create the lock file: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise DestinationError(f"{self.dst}: another shardconv run is writing here"
                                     + (f" (pid {holder})" if holder.isdigit() else "")
                                     + "; wait for it to end, or stop it and run again") from None
            mine = os.fstat(fd)
            now = _identity(self.path, follow=False)
            if now != (mine.st_dev, mine.st_ino) or not stat.S_ISREG(mine.st_mode):
                os.close(fd)  # removed (or replaced) by the run that held it: take the new one
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        raise DestinationError(f"{self.path}: could not take the lock (the file keeps changing)")

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            mine = os.fstat(self.fd)
            if _identity(self.path, follow=False) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "DstLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


RANK_LOCK = ".shardconv.lock.rank-{}"  # held by a rank other than 0 while it writes (distributed.py)


def no_rank_still_writing(dst: Path) -> None:
    """Refuse DST while a rank of an earlier distributed run still writes there (its rank 0 died, it
    did not): its shards, of another plan maybe, could replace this run's after they are recorded, and
    a run that pruned DST would delete its lock. Checked by every run, one process or many, with DST
    locked and before anything in it is touched."""
    for path in sorted(Path(dst).glob(RANK_LOCK.format("*"))):
        try:
            DstLock(path.parent, path.name).acquire().release()
        except DestinationError:
            raise DestinationError(f"{path.parent}: a rank of an earlier run is still writing here ({path.name} is "
                                   "locked); stop it and run again") from None


def _mount_points() -> set[str]:
    """Every mount point of this process (``/proc/self/mountinfo``; empty where there is none)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    unescape = lambda p: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p)  # noqa: E731
    return {unescape(line.split()[4]) for line in lines if len(line.split()) > 4}


class _Remover:
    """Removes entries of DST without following links, and never a folder of SRC or a mount point
    under DST (``shutil.rmtree`` crosses mounts: a bind mount of SRC inside DST would be emptied)."""

    def __init__(self, dst: Path, src: Path | None):
        self.dev = os.stat(dst).st_dev
        self.protected = _src_folders(Path(os.path.realpath(src))) if src is not None else {}
        self.mounts = _mount_points()

    def check(self, folder: str) -> None:
        st = os.lstat(folder)
        if (st.st_dev != self.dev or os.path.realpath(folder) in self.mounts
                or (st.st_dev, st.st_ino) in self.protected):
            raise DestinationError(f"{folder}: a mount point or a folder of SRC inside DST; shardconv does not remove "
                                 "it: unmount it or choose another DST")

    def remove_all(self, paths: list[Path]) -> None:
        """Check every folder first, so a refusal removes nothing; then remove."""
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                for dirpath, _, _ in os.walk(path, followlinks=False):
                    self.check(dirpath)
        for path in paths:
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass


def clear(dst: Path, src: Path | None = None) -> None:
    """Empty DST for ``--overwrite`` (with the lock held), but for the lock file. The index goes first
    (a DST never looks finished beside missing shards) and the journal last, so a DST cleared halfway
    by a kill still looks like an output and ``--overwrite`` clears the rest."""
    check_contents(dst, overwrite=True)
    names = [n for n in os.listdir(dst) if n not in (LOCK_NAME, INDEX_NAME, JOURNAL_NAME)]
    _Remover(dst, src).remove_all([dst / n for n in [INDEX_NAME, *sorted(names), JOURNAL_NAME]])


def prune(dst: Path, keep: set[str], src: Path | None = None) -> None:
    """Remove from a resumed DST everything that is not a regular file under one of this run's names
    (``keep``, relative POSIX paths), and every symbolic link, so no stale file of another run stays
    and nothing is written through a link."""
    keep = set(keep) | {LOCK_NAME}
    keep_dirs = {str(p) for k in keep for p in Path(k).parents if str(p) != "."}
    doomed = []
    remover = _Remover(dst, src)

    def walk(rel_dir: Path) -> None:
        for name in sorted(os.listdir(dst / rel_dir)):
            rel = rel_dir / name
            mode = os.lstat(dst / rel).st_mode
            if stat.S_ISDIR(mode) and str(rel) in keep_dirs:
                remover.check(str(dst / rel))  # files under it are removed one by one
                walk(rel)
            elif not (stat.S_ISREG(mode) and str(rel) in keep):
                doomed.append(dst / rel)

    walk(Path("."))
    remover.remove_all(doomed)


def make_dirs(dst: Path, rel_dir: Path) -> None:
    """Create ``dst / rel_dir`` one level at a time; a level that is a link or not a folder is replaced
    by a real folder, so no file is created through a link."""
    here = Path(dst)
    for part in Path(rel_dir).parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISDIR(mode):
            os.unlink(here)
            mode = None
        if mode is None:
            os.mkdir(here)


_KINDS = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def extra_files(src: Path, max_total: int = DEFAULT_MAX_EXTRA) -> list[tuple[Path, int]]:
    """SRC's other files (files.other_files) with their sizes, checked before anything is written: each
    must be a regular file or a link to one (hub snapshots link into the blob cache); their total must
    not pass ``max_total``. Only ``stat`` is used: a FIFO is never opened."""
    src = Path(src)
    found = []
    for rel in other_files(src):
        path = src / rel
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SourceError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; "
                                 "it would be copied to DST") from None
        except OSError as e:
            raise SourceError(f"{path}: cannot read it to copy to DST: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            via = " (through a symbolic link)" if os.path.islink(path) else ""
            raise SourceError(f"{path}: is {_kind(st.st_mode)}{via}, not a regular file; only regular "
                                 "files of SRC are copied to DST: remove it from SRC")
        found.append((rel, st.st_size))
    total = sum(size for _, size in found)
    if total > max_total:
        rel, size = max(found, key=lambda f: f[1])
        raise SourceError(f"{src / rel}: SRC's other files (tokenizer, code, ...) hold {human(total)}, more than "
                             f"--max-extra-size {human(max_total)}; this one, the largest, holds {human(size)} "
                             "(raise --max-extra-size or remove it from SRC)")
    return found


def copy_regular(source: Path, target: Path) -> None:
    """Copy one of SRC's files into DST through a fresh ``.partial`` file and a rename. The source is
    opened non-blocking and checked again once open (it may have changed since :func:`extra_files`)."""
    fd_in = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{source}: is {_kind(st.st_mode)}, not a regular file; only regular files "
                                 "of SRC are copied to DST")
        tmp = target.with_name(target.name + ".partial")
        fd_out = create_fresh(tmp)
        try:
            try:
                while chunk := os.read(fd_in, COPY_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd_out, view):]
            finally:
                os.close(fd_out)
            os.replace(tmp, target)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:  # a failed write names no file by itself
                e.filename = str(tmp)
            raise
    finally:
        os.close(fd_in)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


def disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC (or EDQUOT) behind ``error``, if any, through ``raise ... from`` chains."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full_message(error: BaseException, cause: OSError, dst: Path, needed: int) -> str:
    """One line: the file that could not be written, what the rest of the run needs and what is free."""
    where = str(error) if isinstance(error, ShardconvError) else f"{cause.filename or dst}: {cause.strerror or cause}"
    return (f"{where}; the rest of this conversion needs {human(needed)} in {dst}, {human(free_bytes(dst))} "
            "free (finished shards are kept: free space and run the same command to resume)")
