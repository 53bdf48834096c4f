"""Write to a temporary path beside the target, then rename it into place.

A reader (or a crash) never sees a half-written file or folder: the target either keeps its old
content or has the complete new one. The temporary path sits in the target's own folder, so
the final :func:`os.replace` is a rename within one file system. Used for the checkpoint
folders of the CLI and the demo, model cards, the training-state file, the bundled SmolLM2
copy, JSON outputs and reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def _temp_name(path: Path, tag: str) -> Path:
    # hidden, unique per writer, and keeping the suffix (writers such as matplotlib's savefig
    # pick the format from it)
    return path.with_name(f".{path.stem}.{tag}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; when the block completes, the file written
    there replaces ``path`` in one rename. On an error the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} (meant to become {path})")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))


def write_dir_atomic(out: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_dir)`` on a new empty folder beside ``out``, then put it at ``out``.

    An existing ``out`` is replaced only after the new folder is complete (moved aside, the new
    one renamed in, the old one deleted); a failure in ``write_fn`` leaves ``out`` untouched.
    Callers decide whether replacing an existing ``out`` is allowed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_dir(complete: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Put the finished folder ``complete`` at ``out`` by renames: an existing ``out`` is moved
    aside first, put back if the rename in fails, and deleted after it succeeds."""
    complete, out = Path(complete), Path(out)
    if out.exists():
        old = _temp_name(out, "old")
        os.replace(out, old)
        try:
            os.replace(complete, out)
        except BaseException:
            os.replace(old, out)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, out)
    return out
