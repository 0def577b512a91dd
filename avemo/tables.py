"""CSV in and out: user tables read strictly, and tables written so a spreadsheet cannot run them.

Manifests and reports are opened in spreadsheets, where a cell starting with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return is a formula (``=cmd|' -C calc'!A0`` runs a
program). Text cells that start so are written with a leading apostrophe, the spreadsheet
convention for "this is text"; the readers here take it off again, so values round-trip.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pandas as pd

from avemo.io import atomic_path

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class TableError(ValueError):
    """A CSV that cannot be used; the message names the file and the line."""


def neutralise(value):
    """Text that a spreadsheet would evaluate -> the same text marked as text (apostrophe first)."""
    if isinstance(value, str) and value and (value[0] in FORMULA_START or value[0] == "'"):
        return "'" + value
    return value


def restore(value):
    """The inverse of ``neutralise``."""
    if isinstance(value, str) and value.startswith("'"):
        return value[1:]
    return value


def _neutralise_frame(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].map(neutralise)
    df.columns = [neutralise(str(c)) for c in df.columns]
    if df.index.dtype == object or pd.api.types.is_string_dtype(df.index):
        df.index = df.index.map(neutralise).rename(df.index.name)
    return df


def write_csv_atomic(path: str | os.PathLike, df: pd.DataFrame, **to_csv) -> None:
    """``df.to_csv`` through an atomic write, with formula-like text cells neutralised."""
    with atomic_path(path) as tmp:
        _neutralise_frame(df).to_csv(tmp, **to_csv)


def read_csv_text(path: str | os.PathLike, **read_csv) -> pd.DataFrame:
    """``pd.read_csv`` with every column as text ('' for empty), neutralised cells restored."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False, **read_csv)
    df.columns = [restore(c) for c in df.columns]
    return df.apply(lambda col: col.map(restore)) if len(df) else df


def read_strict_csv(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] = (),
                    key: str | None = None) -> list[tuple[int, dict[str, str]]]:
    """Rows of a user's CSV as ``(line number, {column: text})``, refusing anything ambiguous.

    Every row must have exactly the header's number of fields (an unquoted comma inside a
    file name would otherwise shift the row silently), the header only known columns, and
    ``key`` (if given) must be non-empty and unique. Errors name the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        rows = [(reader.line_num, r) for r in reader]
    except csv.Error as e:
        raise TableError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    rows = [(n, r) for n, r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise TableError(f"{path}: the file is empty")
    header = [restore(c.strip()) for c in rows[0][1]]
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in required + optional]
    if missing or unknown or len(set(header)) != len(header):
        raise TableError(f"{path}: the header must name the columns {', '.join(required)}"
                         + (f" (optional: {', '.join(optional)})" if optional else "")
                         + f" once each; it has {', '.join(header) or 'none'}")
    out, seen = [], {}
    for line, r in rows[1:]:
        if len(r) != len(header):
            raise TableError(f"{path}, line {line}: {len(r)} fields where the header has {len(header)} "
                             "(a comma inside a file name must be quoted: \"a,b.mp4\")")
        # file names keep their exact spelling; labels and speakers lose stray spaces
        row = {c: restore(v if c == key else v.strip()) for c, v in zip(header, r)}
        if key is not None:
            if not row[key]:
                raise TableError(f"{path}, line {line}: empty '{key}'")
            if row[key] in seen:
                raise TableError(f"{path}, line {line}: '{row[key]}' is listed again (first on line {seen[row[key]]})")
            seen[row[key]] = line
        out.append((line, row))
    return out
