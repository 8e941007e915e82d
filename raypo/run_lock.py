"""One writer per run directory: a lock file that a run holds for its whole life.

``raypo train`` takes :class:`RunLock` on ``RUN_DIR/.raypo.lock`` before it writes anything and
releases it on every exit path. The lock is an ``flock`` on the open file, so the kernel drops it
when the holder dies however it dies (SIGKILL, OOM, a lost node's NFS lease); the file's text
names the holder (host, pid, start time) for the refusal message. A lock file whose lock is free
but whose text still names a holder is stale: that holder ended without releasing it, and the next
run takes it over with a warning naming the crashed holder.

Importing this module does no work and imports nothing from raypo except the run layout.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from raypo.run_layout import RunLayout

logger = logging.getLogger(__name__)


class RunLocked(SystemExit):
    """Another live process holds the run directory's lock (a ``SystemExit``: the CLI prints it
    as the command's one-line error)."""


def _holder_text() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})


def describe_holder(text: str) -> str:
    """``host H, pid P (since T)`` from a lock file's text; the raw text when it is not ours."""
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']} (since {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return f"an unknown holder ({text.strip()[:80]!r})"


def _refusal(command: str, run_path: Path, descriptor: int) -> RunLocked:
    holder = describe_holder(os.pread(descriptor, 4096, 0).decode(errors="replace"))
    return RunLocked(
        f"{command}: {run_path} is in use by another run ({holder}); wait for it to end, stop "
        "it, or choose another --run_dir"
    )


def _unwritable(run_path: Path, error: OSError) -> SystemExit:
    return SystemExit(
        f"raypo: cannot write the run directory {run_path}: {error.strerror or error}; "
        "choose a writable --run_dir (or fix its permissions / free disk space)"
    )


class RunLock:
    """The exclusive lock on ``RUN_DIR/.raypo.lock`` (a context manager; re-entering in the
    process that holds it is refused like any other second writer)."""

    def __init__(self, run_path: Path, command: str = "raypo train") -> None:
        self.run_path = Path(run_path)
        self.path = RunLayout(self.run_path).lock
        self.command = command
        self._descriptor: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLocked` naming its holder; a run directory that
        cannot be created or written raises ``SystemExit`` naming the directory and the cause."""
        try:
            self.run_path.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _unwritable(self.run_path, error) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _refusal(self.command, self.run_path, descriptor)
            os.close(descriptor)
            raise refusal from None
        previous = os.pread(descriptor, 4096, 0).decode(errors="replace")
        if previous.strip():
            logger.warning(
                "%s: taking over the stale lock of %s, which ended without releasing %s",
                self.command,
                describe_holder(previous),
                self.path,
            )
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, _holder_text().encode(), 0)
            os.fsync(descriptor)
        except OSError as error:
            os.close(descriptor)
            raise _unwritable(self.run_path, error) from error
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Clear the holder and drop the lock (a no-op when not held)."""
        if self._descriptor is None:
            return
        descriptor, self._descriptor = self._descriptor, None
        try:
            # Cleared before unlocking: a lock file left with text means its holder crashed.
            os.ftruncate(descriptor, 0)
        except OSError as error:
            logger.warning("could not clear %s: %s", self.path, error)
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._descriptor is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def refuse_if_locked(run_path: Path, command: str = "raypo train") -> None:
    """Raise :class:`RunLocked` when a live run holds ``run_path``'s lock, without taking it or
    creating anything: the CLI's early answer, before it imports torch and Ray."""
    path = RunLayout(Path(run_path)).lock
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(command, Path(run_path), descriptor) from None
    finally:
        os.close(descriptor)
