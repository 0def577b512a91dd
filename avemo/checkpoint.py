"""Self-describing checkpoints that load without executing code.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool,
None, lists, dicts) saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``: the restricted unpickler refuses anything that
would construct arbitrary objects, so a malicious file cannot run code here.

Every checkpoint carries ``format`` (what kind of file it is) and
``format_version``; readers check both and say what is wrong in words.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from avemo.io import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with the reason in the message."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], kind: str, version: int) -> None:
    """Write ``payload`` atomically, tagged with its kind and format version."""
    data = dict(payload)
    data["format"] = kind
    data["format_version"] = int(version)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_checkpoint(path: str | os.PathLike, kind: str, supported_versions: tuple[int, ...],
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint of ``kind``; refuse unsafe, corrupt or incompatible files with a clear reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True raises UnpicklingError for any global outside the allow-list:
        # that is exactly a file that would execute or import code when loaded.
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects that would run code "
            f"when unpickled (only tensors and plain values are allowed). Detail: {_first_line(e)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {_first_line(e)}") from None
    if not isinstance(data, dict) or "format" not in data:
        raise CheckpointError(f"{path}: not an avemo checkpoint (no 'format' field)")
    if data["format"] != kind:
        raise CheckpointError(f"{path}: this is a '{data['format']}' file, expected '{kind}'")
    version = data.get("format_version")
    if version not in supported_versions:
        raise CheckpointError(
            f"{path}: '{kind}' format version {version} is not supported by this avemo "
            f"(supports {', '.join(map(str, supported_versions))}); "
            "re-export it with a matching avemo version or upgrade avemo"
        )
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
