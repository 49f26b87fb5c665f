"""One Prefect server for a whole `make demo` / `dvc repro`, instead of a temporary one per stage process.

A temporary server costs every stage 10-25 s to start, and dies with the stage: a stage killed mid-run
stays "Running" forever because nobody is left to hear it crash. `ensure` starts one server on 127.0.0.1,
records its address and pid in `$PREFECT_HOME/server.json`, and any later stage process reuses it while it
answers; under `dvc repro` the first stage starts it. `python -m orchestration.server` prints its API address
(starting it if needed); `--stop` stops it.

A process killed outright (SIGKILL, the OOM killer) cannot report its crash. Every flow run sends a heartbeat
event (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, set in `orchestration`); `ensure` installs Prefect's zombie-flow
automation on the server, which marks a run Crashed once its heartbeats stop.
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
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from proxytune.io import atomic_write_text
from proxytune.params import ProxytuneError

STARTUP_SECONDS = 180  # a busy 2-core machine needs a while to migrate a fresh database
CRASH_WATCH = "proxytune: a flow run whose heartbeats stop is Crashed"
MISSED_HEARTBEATS = 3  # silence this many heartbeat periods long means the process is gone, not busy


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


def default_port() -> int:
    """Prefect's own server port setting (`PREFECT_SERVER_API_PORT`, 4200: the UI address the README gives)."""
    from prefect.settings import get_current_settings

    return get_current_settings().server.api.port


def running(prefect_home: Path) -> str | None:
    """The API address of the recorded server, else of one on the default port (`make prefect-server`), if it
    answers."""
    record = prefect_home / "server.json"
    recorded = [json.loads(record.read_text())["api"]] if record.is_file() else []
    return next((api for api in [*recorded, f"http://127.0.0.1:{default_port()}/api"] if healthy(api)), None)


def ensure(prefect_home: Path) -> str:
    """A running server's API address, else start and record a detached one (on the default port if free);
    either way with the crash watch installed."""
    api = running(prefect_home)
    if api is None:
        with socket.socket() as s:
            port = default_port() if s.connect_ex(("127.0.0.1", default_port())) != 0 else None
        server, api = start(prefect_home, port, detach=True)
        atomic_write_text(prefect_home / "server.json", json.dumps({"api": api, "pid": server.pid}))
        print(f"started a Prefect server for this and later runs: {api.removesuffix('/api')} "
              f"(stop it: python -m orchestration.server --stop)", file=sys.stderr)
    watch_for_crashes(api)
    return api


def watch_for_crashes(api: str, silence: timedelta | None = None) -> None:
    """Install (once) Prefect's zombie-flow automation on the server at `api`: a run of one of our flows that has sent
    a heartbeat and then nothing for `silence` (default: MISSED_HEARTBEATS heartbeat periods) becomes Crashed."""
    from prefect import get_client
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        silence = silence or timedelta(seconds=MISSED_HEARTBEATS * get_current_settings().flows.heartbeat_frequency)
        with get_client(sync_client=True) as client:
            if client.read_automations_by_name(CRASH_WATCH):
                return
        Automation(
            name=CRASH_WATCH,
            description="The process running the flow was killed: it stopped sending heartbeats.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                # only our flows, which beat every 30 s: others on a shared server may keep Prefect's 180 s
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": ["proxytune", "proxytune-*"]},
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.*"},  # another heartbeat or any state change
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive, threshold=1, within=silence),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
                f"no heartbeat for {silence.total_seconds():.0f} s: the process running this flow was killed"))],
        ).create()


@contextlib.contextmanager
def reused(start: bool = False) -> Iterator[str | None]:
    """Unless an API is configured, point Prefect at a running server (`running`), or with `start` at one started
    now (`ensure`), instead of a temporary one of its own; yields the address used (None: Prefect's own choice)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        api = None
    else:
        api = ensure(home()) if start else running(home())
    with temporary_settings({PREFECT_API_URL: api}) if api else contextlib.nullcontext():
        yield api


@contextlib.contextmanager
def started() -> Iterator[str]:
    """The configured API, else a running server's, else one started now and stopped on leaving: for a command
    whose helpers (workers) need a server that outlives each process, not Prefect's temporary one."""
    from prefect.settings import get_current_settings

    ours = not get_current_settings().api.url and running(home()) is None
    try:
        with reused(start=True) as api:
            yield api or get_current_settings().api.url
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
