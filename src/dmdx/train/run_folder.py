"""A run folder as the commands that write into it see it: what it holds, who is using it, and a start that fails
leaves it as it was.

- :func:`find_run` says whether a folder holds a run (its ``config.json``, checkpoints or exported model) and how far
  it got; :func:`check_start` refuses a fresh start into a folder that holds one (without ``--resume``), a
  ``--resume`` where there is none ("no run to resume in X"), and a folder another process is using.
- :class:`RunFolder` is held for the life of one command: it creates the folder if needed, locks it (an exclusive
  ``flock`` on ``RUN/.lock``, which records the holder's pid, host, start time and command; the kernel releases it
  when the holder ends, however it ends, so a killed run never blocks the next) and, when the start fails with a
  user error (a ``ValueError`` or ``OSError``: a bad config, a missing or unreadable file) before training began,
  removes what this start created (the folder itself when the start created it).  Interrupted or crashed set-ups
  keep what they collected (teacher pairs, encoded prompts): running the command again continues them.

Under torchrun only global rank 0 locks the folder and cleans up after it; the other ranks only read it.  ``flock``
locks hold on local file systems and on NFS (Linux emulates them with POSIX locks there); a cluster file system
mounted without lock support (Lustre without ``flock``) does not stop two runs.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: folders are not locked
    fcntl = None

from ..models import MODEL_JSON
from .checkpoint import checkpoint_steps

LOCK = ".lock"
CONFIG = "config.json"


@dataclass
class RunState:
    """What a run folder holds."""

    path: Path
    method: str | None  # the method of its config.json ("dsm": a teacher-training run), None without one
    steps: int | None  # train.steps of its config.json
    step: int | None  # its latest checkpoint's step, None before the first
    resumable: bool  # it has a config.json (what --resume reads)

    def describe(self) -> str:
        what = ("a teacher-training run" if self.method == "dsm" else f"a {self.method!r} run" if self.method
                else "a dmdx model" if not self.resumable else "a run")
        if self.step is None:
            return f"{what} (no checkpoint yet)" if self.resumable else what
        if self.steps is not None and self.step >= self.steps:
            return f"{what} (finished: step {self.step} of {self.steps})"
        return f"{what} (at step {self.step} of {self.steps})" if self.steps else f"{what} (at step {self.step})"


def find_run(path: str | Path) -> RunState | None:
    """The run in folder ``path``: one with a ``config.json``, a checkpoint or an exported ``model.json``; else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    config = path / CONFIG
    steps = checkpoint_steps(path)
    if not config.is_file() and not steps and not (path / MODEL_JSON).is_file():
        return None
    method = total = None
    if config.is_file():
        try:
            saved = json.loads(config.read_text())
            m = saved.get("method")
            method = m.get("name") if isinstance(m, dict) else None
            total = saved.get("train", {}).get("steps")
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    return RunState(path, method, total, steps[-1] if steps else None, config.is_file())


def lock_holder(path: str | Path) -> str | None:
    """Who holds the lock of run folder ``path`` ("pid 123 on host, since ...: command"), or None when nobody does."""
    lock = Path(path) / LOCK
    if fcntl is None or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return _describe_holder(fd)
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return None


def _describe_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not said which yet)"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}: {info.get('command')}"


def in_use(path: Path, holder: str) -> ValueError:
    return ValueError(f"{path} is in use by another dmdx process ({holder}); wait for it to end or stop it (its lock, "
                      f"{path / LOCK}, goes with the process)")


def check_start(path: str | Path, resume: bool) -> RunState | None:
    """Refuse to start in run folder ``path`` what cannot start there, before anything is read or written: a folder
    another process is using; a ``--resume`` where no run is; a fresh run where one already is.  Returns the run."""
    path = Path(path)
    holder = lock_holder(path)
    if holder is not None:
        raise in_use(path, holder)
    return _check_contents(path, resume)


def _check_contents(path: Path, resume: bool) -> RunState | None:
    state = find_run(path)
    if resume and (state is None or not state.resumable):
        why = ("the folder does not exist" if not path.exists() else "not a folder" if not path.is_dir()
               else "it holds no config.json")
        raise ValueError(f"no run to resume in {path} ({why}); start one without --resume")
    if not resume and state is not None:
        hint = ("continue it with --resume (--steps N to go further), or choose another --out" if state.resumable
                else "choose another --out")
        raise ValueError(f"{path} already holds {state.describe()}; {hint}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    return state


class RunFolder:
    """Run folder ``path`` held by this process for one command (a context manager); ``main=False`` (torchrun ranks
    other than 0) makes it do nothing.

    On entry: :func:`check_start` (unless ``resume`` is None), then the folder is created (and its missing parents)
    and locked, or a ``ValueError`` says who holds it or that it cannot be written.  :meth:`started` marks the end of the start (set-up done, training begins).  On an
    exit by a ``ValueError`` or ``OSError`` before that, what this start created in the folder is removed (the
    folder, with the parents it created, when it created it)."""

    def __init__(self, path: str | Path, resume: bool | None = None, main: bool = True, command: str | None = None):
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.resume = resume  # None: no check of what the folder holds (the demo's folder, resumed stage by stage)
        self.main = main
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        prog = "dmdx" if prog in ("__main__.py", "dmdx") else prog  # python -m dmdx, or the dmdx script
        self.command = command or " ".join([prog, *sys.argv[1:]])
        self._fd: int | None = None
        self._created: Path | None = None  # the topmost folder this start created
        self._before: set[str] = set()
        self._started = False

    def started(self) -> None:
        """The start is over: from now on a failure keeps everything (checkpoints, logs: continue with --resume)."""
        self._started = True

    def __enter__(self) -> "RunFolder":
        if not self.main:
            return self
        if self.resume is not None:
            check_start(self.path, self.resume)
        try:
            self._create()
            self._lock()
            if self.resume is not None:
                _check_contents(self.path, self.resume)  # again, now that no other dmdx process can start here
        except OSError as e:
            self._remove_created()
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ValueError(f"cannot write the run folder {self.path}: {e.strerror} ({e.filename or self.path}); "
                             "choose an --out you can write") from None
        except BaseException:
            self._unlock()
            self._remove_created()
            raise
        self._before = set(os.listdir(self.path))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.main:
            return
        failed_start = (exc_type is not None and not self._started and issubclass(exc_type, (ValueError, OSError)))
        try:
            if failed_start:
                self._undo()
        finally:
            self._unlock()
            if failed_start:
                self._remove_created()

    # -- creation and clean-up -------------------------------------------------------------------------------
    def _create(self) -> None:
        if self.path.is_dir():
            return
        if self.path.exists():
            raise ValueError(f"--out {self.path} is a file, not a folder")
        top = self.path
        while not top.parent.exists():
            top = top.parent
        self.path.mkdir(parents=True)
        self._created = top

    def _undo(self) -> None:
        """Remove the entries this start added to the folder (the lock stays until :meth:`_unlock`)."""
        for name in set(os.listdir(self.path)) - self._before - {LOCK}:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _remove_created(self) -> None:
        if self._created is None:
            return
        p = self.path
        while True:  # the folders this start made, deepest first, if nothing else is in them
            try:
                p.rmdir()
            except OSError:
                return
            if p == self._created:
                return
            p = p.parent

    # -- the lock ----------------------------------------------------------------------------------------------
    def _lock(self) -> None:
        if fcntl is None:
            return
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _describe_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
                os.close(fd)
                if holder is None:
                    raise
                raise in_use(self.path, holder) from None
            try:  # the holder before us may have removed the file as we opened it: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": self.command}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)  # while still held: a waiter re-checks the file it locked
        finally:
            os.close(self._fd)
            self._fd = None
