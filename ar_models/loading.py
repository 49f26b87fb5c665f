"""Loading released weights strictly: named sizes, key-for-key checks that fail with one line, and quiet
transformers. A checkpoint that does not fit is an error, never a silent partial load."""
from __future__ import annotations

import contextlib
import os
import re

import torch
from torch import nn


def pick(sizes: dict, name: str, what: str):
    """The config named `name` in `sizes`; one-line ValueError listing the choices otherwise."""
    if name not in sizes:
        raise ValueError(f"unknown {what} size {name!r}; choose one of {', '.join(sizes)}")
    return sizes[name]


def fail_on(path: str | os.PathLike, what: str, problems: dict[str, list[str]]) -> None:
    """One-line ValueError naming `path` and up to five names per kind of problem, when there are any."""
    parts = []
    for label, names in problems.items():
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            parts.append(f"{label}: {', '.join(names[:5])}{more}")
    if parts:
        raise ValueError(f"{path}: does not fit {what}; " + "; ".join(parts))


def check_keys(path, what: str, expected: dict[str, tuple], found: dict[str, tuple], flexible=frozenset()) -> None:
    """Fail (see `fail_on`) on any missing, unexpected or mis-shaped tensor; `flexible` ones may differ in shape."""
    fail_on(path, what, {
        "missing": sorted(expected.keys() - found.keys()),
        "unexpected": sorted(found.keys() - expected.keys()),
        "mis-shaped": sorted(f"{k} {tuple(found[k])} != {tuple(expected[k])}"
                             for k in expected.keys() & found.keys() - set(flexible)
                             if tuple(found[k]) != tuple(expected[k])),
    })


def load_strict(model: nn.Module, path, state: dict[str, torch.Tensor], skip: re.Pattern | None = None,
                flexible=frozenset()) -> None:
    """Load `state` into `model` key for key. Tensors matching `skip` that the model lacks are dropped (buffers
    the official code saves but we rebuild); `flexible` ones of another shape keep the model's value."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not (skip and skip.fullmatch(k))}
    check_keys(path, type(model).__name__, {k: v.shape for k, v in expected.items()},
               {k: v.shape for k, v in state.items()}, flexible)
    model.load_state_dict({k: expected[k] if k in flexible and v.shape != expected[k].shape else v
                           for k, v in state.items()})


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars and no multi-line load reports from transformers: callers check keys themselves and
    raise one line."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
