"""Atomic file output: everything is written to a temporary name in the same folder and renamed into
place, so an interrupted run never leaves a half-written checkpoint, table or report."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata) if metadata else None,
        )


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_dir_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and move the finished folder onto ``path``."""
    with atomic_dir(path) as tmp:
        write(tmp)
    return Path(path)


def check_model_source(source: str | Path, what: str = "model") -> str:
    """A local folder that exists, or something shaped like a hub id (``name`` or ``namespace/name``).

    A path that can only be local (absolute, ``./``-relative, or with more than one ``/``) and does not
    exist is reported here, instead of as a hub lookup error from deep inside ``from_pretrained``.
    """
    text = str(source)
    if Path(text).exists():
        if not Path(text).is_dir():
            raise FileNotFoundError(f"{what} {text} is a file; give the folder written by save_pretrained")
        return text
    local_only = Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
    if local_only:
        raise FileNotFoundError(
            f"{what} folder {text} does not exist (and it is not a hub id 'namespace/name')"
        )
    return text
