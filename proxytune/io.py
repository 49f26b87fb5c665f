"""File helpers: content hashing, all-or-nothing writes, and where the content-addressed caches live."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

_CHUNK = 1 << 20
_HASHES: dict[tuple, str] = {}
T = TypeVar("T")
logger = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    """Content hash, remembered per (file, size, mtime) so multi-GB weights are read once per process."""
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hash of a file, or of a folder's relative names and contents (order-independent of listing)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
        h.update(p.relative_to(path).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    On any error the temp folder is removed and whatever `final` held before stays untouched,
    so a failed stage never leaves half-written outputs.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make shared outputs unreadable to others
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `final` for any writer (torch.save, save_file...); on success it
    becomes `final` in one rename, so readers never see a torn file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def cache_dir(kind: str) -> Path:
    """Project-local content-addressed caches (token codes, embeddings) that outlive stage outputs:
    `$PROXYTUNE_CACHE`, else `.proxytune/cache` in the project."""
    path = Path(os.environ.get("PROXYTUNE_CACHE", Path.cwd() / ".proxytune" / "cache")) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_or_heal(path: str | Path, load: Callable[[Path], T], what: str = "cache entry") -> T | None:
    """`load(path)`, or None when there is nothing usable there for the caller to recompute.

    Cache entries are written atomically, yet a disk fault, a full disk under another writer or a hand edit can
    still leave a torn one; a bad entry is logged by path and deleted, so the run heals it instead of crashing.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as e:  # whatever the reader raises (OSError, SafetensorError, pickle, json...) means unreadable
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        logger.warning("%s %s is unreadable (%s); recomputing", what, path, reason)
        path.unlink(missing_ok=True)
        return None


def canonical_safetensors(path: str | Path) -> None:
    """Rewrite a .safetensors file's header with its `__metadata__` keys sorted. safetensors keeps metadata in a
    Rust HashMap, so a file with several keys (diffusers' LoRA: format + adapter config) gets them in a random
    order per save: identical tensors, different bytes, and DVC would re-run every stage downstream."""
    path = Path(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if list(header.get("__metadata__") or {}) == sorted(header.get("__metadata__") or {}):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        with atomic_file(path) as tmp, open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(f, out, _CHUNK)
