"""One run at a time per output location: a second run that would write the same place stops (or waits),
naming the run that holds it.

Each place a run writes (a stage's output folder or file) has a lock file in the project's `.proxytune/locks/`,
named after the place's resolved path and held with `fcntl.flock` for the whole run. The kernel drops a flock
when its holder exits, however it exits, so a killed run never blocks the next one; the file only tells who
holds it (pid, host, start, command). A released lock file is removed, so one that is found with a holder
written in it was left by a run that died: it is taken over with a warning.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from proxytune.io import sha256_bytes
from proxytune.params import ProxytuneError

WAIT_ENV = "PROXYTUNE_RUN_WAIT"
LOCKS = Path(".proxytune") / "locks"
POLL_S = 0.5

log = logging.getLogger(__name__)
# A process holds each lock once: the CLI takes its run's locks before Prefect starts, then the flow it starts
# takes them again. lock file -> (descriptor, depth)
_held: dict[Path, tuple[int, int]] = {}
_guard = threading.Lock()


def lock_file(place: str | Path) -> Path:
    """The lock file for writing `place`: the same for every process that runs in this project."""
    resolved = Path(place).resolve()
    return Path.cwd() / LOCKS / f"{resolved.name}-{sha256_bytes(str(resolved).encode())[:16]}.lock"


def wait_seconds(value: float | None = None) -> float:
    """How long a run waits for another one: `value`, else $PROXYTUNE_RUN_WAIT, else 0 (stop at once)."""
    if value is None:
        raw = os.environ.get(WAIT_ENV, "0")
        try:
            value = float(raw)
        except ValueError:
            raise ProxytuneError(f"{WAIT_ENV}: {raw!r} is not a number of seconds") from None
    if not value >= 0:
        raise ProxytuneError(f"run lock: the wait must be 0 or more seconds, got {value}")
    return value


@contextlib.contextmanager
def run_lock(places: Iterable[str | Path], wait: float | None = None) -> Iterator[None]:
    """Hold the locks of every place in `places` for the block, or raise a one-line ProxytuneError naming the
    run that holds one (after waiting up to `wait` seconds, see `wait_seconds`)."""
    wait = wait_seconds(wait)
    deadline = time.monotonic() + wait
    wanted = sorted({lock_file(p): Path(p) for p in places}.items())  # one order for all: no deadlock
    taken: list[Path] = []
    told = False
    try:
        for file, place in wanted:
            while not _take(file, place):
                holder = _holder(file)
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait:g} s)" if wait else ""
                    raise ProxytuneError(
                        f"another proxytune run ({holder}) is writing {place}; wait for it or stop it{waited}")
                if not told:
                    log.warning("waiting up to %g s for another proxytune run (%s) writing %s", wait, holder, place)
                    told = True
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            taken.append(file)
        yield
    finally:
        for file in reversed(taken):
            _release(file)


def _take(file: Path, place: Path) -> bool:
    with _guard:
        if file in _held:
            fd, depth = _held[file]
            _held[file] = (fd, depth + 1)
            return True
        file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            with contextlib.suppress(FileNotFoundError):
                if os.stat(file).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # its holder removed it between our open and lock: take the new one
        left = _read(fd)
        if left:
            log.warning("taking over the lock of a proxytune run that ended without releasing it (%s): %s",
                        _describe(left), place)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        _held[file] = (fd, 1)
        return True


def _release(file: Path) -> None:
    with _guard:
        fd, depth = _held[file]
        if depth > 1:
            _held[file] = (fd, depth - 1)
            return
        del _held[file]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)  # while still locked: a waiting run then opens a new file, never this one
        os.close(fd)


def _me() -> dict:
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    argv = ["python", "-m", module, *sys.argv[1:]] if module else [Path(sys.executable).name, *sys.argv]
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _read(fd: int) -> dict | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {}


def _holder(file: Path) -> str:
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return "just finishing"
    try:
        return _describe(_read(fd))
    finally:
        os.close(fd)


def _describe(holder: dict | None) -> str:
    if not holder:
        return "just starting"
    host = holder.get("host")
    where = "" if host in (None, socket.gethostname()) else f" on {host}"
    return f"pid {holder.get('pid', '?')}{where}, started {holder.get('started', '?')}: {holder.get('command', '?')}"
