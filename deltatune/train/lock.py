"""One training run per output directory at a time.

    with output_dir_lock("runs/sft"):     # RunLockedError if another live process trains there
        ...

The lock is `output_dir/.deltatune-lock`, held with `fcntl.flock`: the kernel releases it when the holding
process ends in any way (exit, exception, kill -9, a crash), so a lock file left behind by a dead run never
blocks the next one: the next run simply takes it again. The file holds the holder's pid and host, for the
message. It is removed on release; a run that opened the file just before that removal could lock the removed
file, so after taking the lock each run checks that the path still names the file it locked, else retries.
Without fcntl (Windows) there is no lock. On a network file system flock may be local to each machine.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.config import ConfigError

LOCK_FILE = ".deltatune-lock"


class RunLockedError(ConfigError):
    """Another live process is training into the same output_dir."""


def make_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create output_dir (and its parents); an unusable one is a ConfigError naming the key and the OS reason."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output_dir {path} exists and is not a directory; choose another output_dir") from None
    except OSError as exc:
        raise ConfigError(f"output_dir {path} cannot be created: {exc.strerror or exc} ({exc.filename or path})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path} is not writable by this user; choose another output_dir")
    return path


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the output directory's lock for the duration of the block (see the module docstring)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = make_output_dir(output_dir) / LOCK_FILE
    handle = _acquire(path, fcntl)
    try:
        yield
    finally:
        try:
            path.unlink()  # while still locked: a waiting run then finds the path gone and retries
        except OSError:
            pass
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _acquire(path: Path, fcntl) -> object:
    for _ in range(100):  # each retry means another run released the lock between our open and our flock
        try:
            handle = open(path, "a+")
        except OSError as exc:
            raise ConfigError(f"output_dir {path.parent}: cannot create the lock file {path.name}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"output_dir {path.parent} is in use by a running training ({holder}); wait for it to finish, or "
                "choose another output_dir"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            return handle
        handle.close()
    raise RunLockedError(f"output_dir {path.parent}: could not take the lock {path.name}; another run keeps replacing it")
