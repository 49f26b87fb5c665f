"""One Prefect server for a whole `make demo` / `dvc repro`, instead of a temporary one per stage process.

A temporary server costs every stage 10-25 s to start, and dies with the stage: a stage killed mid-run
stays "Running" forever because nobody is left to hear it crash. `ensure` starts one server on 127.0.0.1,
records its address and pid in `$PREFECT_HOME/server.json`, and any later stage process reuses it while it
answers. `python -m orchestration.server` prints its API address (starting it if needed); `--stop` stops it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from proxytune.params import ProxytuneError

DEFAULT_PORT = 4200  # the UI address the README gives
STARTUP_SECONDS = 180  # a busy 2-core machine needs a while to migrate a fresh database


def home() -> Path:
    """Where Prefect keeps its records (`orchestration` points PREFECT_HOME into the project)."""
    return Path(os.environ["PREFECT_HOME"])


def healthy(api: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as answer:
            return answer.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(prefect_home: Path, port: int | None = None, detach: bool = False) -> tuple[subprocess.Popen, str]:
    """A `prefect server start` on 127.0.0.1 (`port` None: a free one) keeping its database in `prefect_home`,
    once it answers; `detach`: in its own session, so it outlives the caller and its terminal's Ctrl-C."""
    port = port or free_port()
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(prefect_home / "server.log", "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=detach)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + STARTUP_SECONDS
    while not healthy(api):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise ProxytuneError(f"prefect server on port {port} did not start (see {prefect_home / 'server.log'})")
        time.sleep(0.5)
    return server, api


def running(prefect_home: Path) -> str | None:
    """The API address of the recorded server, else of one on the default port (`make prefect-server`), if it
    answers."""
    record = prefect_home / "server.json"
    recorded = [json.loads(record.read_text())["api"]] if record.is_file() else []
    return next((api for api in [*recorded, f"http://127.0.0.1:{DEFAULT_PORT}/api"] if healthy(api)), None)


def ensure(prefect_home: Path) -> str:
    """A running server's API address, else start and record a detached one (on the default port if free)."""
    api = running(prefect_home)
    if api is None:
        with socket.socket() as s:
            port = DEFAULT_PORT if s.connect_ex(("127.0.0.1", DEFAULT_PORT)) != 0 else None
        server, api = start(prefect_home, port, detach=True)
        (prefect_home / "server.json").write_text(json.dumps({"api": api, "pid": server.pid}))
    return api


@contextlib.contextmanager
def reused() -> Iterator[str | None]:
    """Unless an API is configured, point Prefect at a running server (`running`) instead of a temporary one
    of its own; yields the address used (None: Prefect's own choice)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    api = None if get_current_settings().api.url else running(home())
    with temporary_settings({PREFECT_API_URL: api}) if api else contextlib.nullcontext():
        yield api


@contextlib.contextmanager
def started() -> Iterator[str]:
    """The configured API, else a running server's, else one started now and stopped on leaving: for a command
    whose helpers (workers) need a server that outlives each process, not Prefect's temporary one."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    api = get_current_settings().api.url or running(home())
    ours = api is None
    try:
        with temporary_settings({PREFECT_API_URL: api or ensure(home())}) as settings:
            yield settings.api.url
    finally:
        if ours:
            stop(home())


def stop(prefect_home: Path) -> bool:
    """Stop the recorded server by its pid; False if none was recorded or it had already gone."""
    record = prefect_home / "server.json"
    if not record.is_file():
        return False
    pid = json.loads(record.read_text())["pid"]
    record.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.server", description=__doc__)
    parser.add_argument("--stop", action="store_true", help="stop the recorded server")
    args = parser.parse_args(argv)
    if args.stop:
        print("stopped" if stop(home()) else "no server was running")
        return 0
    try:
        print(ensure(home()))
    except ProxytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
