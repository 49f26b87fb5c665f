"""Progress of long loops (training steps, images drawn): a tqdm bar in the terminal, a log line at a
sensible rate (step, loss, it/s, ETA) and the listeners a caller installed (a Prefect progress artifact).

The loops stay free of orchestration: they only say `bar.advance(loss=...)`; whoever runs them (the stage
wrapper in `orchestration.stage`) listens with `reporting(callback)`. Log lines go to the `proxytune.progress`
logger, which the Prefect settings route into the run's logs.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tqdm import tqdm

logger = logging.getLogger("proxytune.progress")
LOG_EVERY_SECONDS = 15.0  # a slow step logs each time; a fast loop at most this often (and its first and last step)


@dataclass(frozen=True)
class Tick:
    """What a listener hears: loop `name` has done `done` of `total` `unit`s at `rate` per second."""

    name: str
    unit: str
    done: int
    total: int
    rate: float
    eta: float
    values: dict


Listener = Callable[[Tick], None]
_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar("progress_listeners", default=())


@contextlib.contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Every `Progress` opened inside this context also reports its ticks to `listener`."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`total` units of work named `name` (`unit`: step, image), `start` of them already done (a resumed run)."""

    def __init__(self, name: str, total: int, unit: str = "step", start: int = 0,
                 log_every: float = LOG_EVERY_SECONDS):
        self.name, self.total, self.unit, self.done = name, int(total), unit, int(start)
        self.start, self.log_every = int(start), log_every
        self.began = self.logged = time.monotonic()
        self.bar = tqdm(total=self.total, initial=self.start, desc=name, unit=unit, file=sys.stderr,
                        dynamic_ncols=True, leave=False, disable=None)  # None: no bar when stderr is no terminal

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def advance(self, n: int = 1, **values: float) -> None:
        """`n` more units done; `values` (loss...) are shown with them."""
        self.done += n
        now = time.monotonic()
        rate = (self.done - self.start) / max(now - self.began, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self.bar.update(n)
        last = self.done >= self.total
        if last or self.done - n == self.start or now - self.logged >= self.log_every:
            self.logged = now
            shown = "".join(f" {k} {v:.4g}" for k, v in values.items())
            logger.info("%s: %s %d/%d%s | %.2f %s/s | ETA %s", self.name, self.unit, self.done, self.total, shown,
                        rate, self.unit, clock(eta))
        tick = Tick(self.name, self.unit, self.done, self.total, rate, eta, dict(values))
        for listener in _listeners.get():
            listener(tick)
