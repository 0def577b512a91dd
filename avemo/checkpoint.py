"""Self-describing checkpoints that load without executing code.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool,
None, lists, dicts) saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``: the restricted unpickler refuses anything that
would construct arbitrary objects, so a malicious file cannot run code here.

Every checkpoint carries ``format`` (what kind of file it is) and
``format_version``; readers check both and say what is wrong in words. It also carries
``sha256``, a digest of everything else in it: torch's zip reader checks no CRC, so
without it a file with overwritten bytes would load with silently changed weights.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from avemo.io import first_line, write_bytes_atomic

DIGEST_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with the reason in the message."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], kind: str, version: int) -> None:
    """Write ``payload`` atomically, tagged with its kind, format version and digest.

    Serialised in memory first, so a full disk surfaces as ``NoSpaceError`` from the one
    write (torch's own writer reports it as an opaque RuntimeError)."""
    data = {k: v for k, v in payload.items() if k != DIGEST_KEY}
    data["format"] = kind
    data["format_version"] = int(version)
    data[DIGEST_KEY] = payload_digest(data)
    buf = io.BytesIO()
    torch.save(data, buf)
    write_bytes_atomic(path, buf.getvalue())


def payload_digest(obj: Any) -> str:
    """sha256 over a checkpoint's contents: every tensor's bytes, dtype and shape, every plain value."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, dict):
        keys = sorted((k for k in obj if k != DIGEST_KEY), key=repr)
        h.update(b"{%d" % len(keys))
        for k in keys:
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def load_checkpoint(path: str | os.PathLike, kind: str, supported_versions: tuple[int, ...],
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint of ``kind``; refuse unsafe, corrupt or incompatible files with a clear reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?)")
    if not zipfile.is_zipfile(path):
        # torch would try it as a legacy pickle and blame unsafe objects; it is simply not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): it is not a PyTorch "
                              "zip archive (a text file, random bytes, or a cut-off copy)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True raises UnpicklingError for any global outside the allow-list:
        # that is exactly a file that would execute or import code when loaded.
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects that would run code "
            f"when unpickled (only tensors and plain values are allowed){_unsafe_detail(e)}"
        ) from None
    except Exception as e:     # torch's reader fails in many ways on a damaged archive
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {first_line(e)}") from None
    if not isinstance(data, dict) or "format" not in data:
        raise CheckpointError(f"{path}: not an avemo checkpoint (no 'format' field)")
    if data["format"] != kind:
        raise CheckpointError(f"{path}: this is a '{first_line(data['format'])}' file, expected '{kind}'")
    version = data.get("format_version")
    if version not in supported_versions:
        raise CheckpointError(
            f"{path}: '{kind}' format version {first_line(version)} is not supported by this avemo "
            f"(supports {', '.join(map(str, supported_versions))}); "
            "re-export it with a matching avemo version or upgrade avemo"
        )
    # files written before digests existed (the shipped face encoder among them) have none
    if DIGEST_KEY in data and data[DIGEST_KEY] != payload_digest(data):
        raise CheckpointError(f"{path}: the contents do not match the checksum stored with them: the file "
                              "was altered or damaged after it was written; use an intact copy")
    return data


def _unsafe_detail(e: BaseException) -> str:
    """The offending global from torch's message, without its advice to load unsafely."""
    for line in str(e).splitlines():
        line = first_line(Exception(line.strip()))
        if "GLOBAL" in line or "Unsupported" in line:
            return f" ({line[:200]})"
    return ""


def require(cond: bool, path, what: str) -> None:
    """Payload validation: ``CheckpointError`` naming the file and what is wrong with it."""
    if not cond:
        raise CheckpointError(f"{path}: {what}")
