"""Speaker-independent splits: no speaker ever appears in two of train / val / test."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


class SplitError(ValueError):
    """A split that cannot be made or is not speaker-independent."""


@dataclass
class Split:
    method: str
    train: list[int]
    val: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)
    speakers: dict[str, list[str]] = field(default_factory=dict)   # part -> speakers in it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(**d)


def _require_speakers(speakers: list[str | None]) -> None:
    missing = [i for i, s in enumerate(speakers) if not s]
    if missing:
        raise SplitError(f"{len(missing)} clips have no speaker, so no speaker-independent split is possible; "
                         "add a speaker column to the labels, or pass --no-split to train on everything")


def _from_speaker_sets(method: str, speakers: list[str | None], val: set[str], test: set[str]) -> Split:
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, s in enumerate(speakers):
        parts["test" if s in test else "val" if s in val else "train"].append(i)
    if not parts["train"]:
        raise SplitError(f"{method}: the training part has no speaker left")
    names = {p: sorted({speakers[i] for i in idx}) for p, idx in parts.items()}
    return Split(method, parts["train"], parts["val"], parts["test"], names)


def _parse_list(text: str | list[str] | None) -> list[str]:
    if text is None:
        return []
    items = text if isinstance(text, list) else text.split(",")
    return [s.strip() for s in items if s.strip()]


def explicit_split(speakers: list[str | None], val_speakers, test_speakers) -> Split:
    """--val-speakers / --test-speakers: named speakers; every named speaker must exist."""
    _require_speakers(speakers)
    val, test = set(_parse_list(val_speakers)), set(_parse_list(test_speakers))
    known = set(speakers)
    for part, names in (("val", val), ("test", test)):
        unknown = sorted(names - known)
        if unknown:
            raise SplitError(f"--{part}-speakers names {unknown}, which have no clip in the cache "
                             f"(speakers: {', '.join(sorted(known))})")
    both = sorted(val & test)
    if both:
        raise SplitError(f"speakers {both} are in both the validation and the test part")
    return _from_speaker_sets("explicit", speakers, val, test)


def column_split(speakers: list[str | None], column: list[str]) -> Split:
    """The split column of the labels, checked for speaker independence."""
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, p in enumerate(column):
        parts[p].append(i)
    seen: dict[str, str] = {}
    for p, idx in parts.items():
        for i in idx:
            s = speakers[i]
            if s and seen.setdefault(s, p) != p:
                raise SplitError(f"the split column puts speaker '{s}' in both '{seen[s]}' and '{p}'")
    if not parts["train"]:
        raise SplitError("the split column has no 'train' clip")
    names = {p: sorted({speakers[i] for i in idx if speakers[i]}) for p, idx in parts.items()}
    return Split("column", parts["train"], parts["val"], parts["test"], names)


def auto_split(speakers: list[str | None], seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.15) -> Split:
    """Speakers shuffled with ``seed``; about the given fractions of speakers for val and test."""
    _require_speakers(speakers)
    unique = sorted(set(speakers))
    if len(unique) < 2:
        raise SplitError(f"only one speaker ('{unique[0]}'): a speaker-independent split needs at least two "
                         "(pass --no-split to train on everything without evaluation)")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n_test = max(1, round(test_fraction * len(unique))) if len(unique) >= 3 else 0
    n_val = max(1, round(val_fraction * len(unique)))
    if n_test + n_val >= len(unique):
        n_test = max(0, len(unique) - 1 - n_val)
    test, val = set(order[:n_test]), set(order[n_test:n_test + n_val])
    return _from_speaker_sets("auto", speakers, val, test)


def kfold_splits(speakers: list[str | None], k: int, val: str = "next") -> list[Split]:
    """K speaker folds (speakers sorted, dealt round-robin); fold i tests on group i.

    ``val="next"`` validates (early stopping) on group i+1 and trains on the rest;
    ``val="none"`` trains on all other groups for a fixed number of epochs.
    """
    _require_speakers(speakers)
    unique = sorted(set(speakers))
    if k < 2:
        raise SplitError(f"--folds needs K >= 2, got {k}")
    if k > len(unique):
        raise SplitError(f"--folds {k} but the cache has only {len(unique)} speakers: a split with no speaker")
    if val == "next" and k < 3:
        raise SplitError("--fold-val next needs K >= 3 (train, val and test groups); use --fold-val none")
    groups = [unique[g::k] for g in range(k)]
    out = []
    for i in range(k):
        val_set = set(groups[(i + 1) % k]) if val == "next" else set()
        s = _from_speaker_sets(f"fold {i + 1}/{k}", speakers, val_set, set(groups[i]))
        out.append(s)
    return out


def no_split(n: int) -> Split:
    return Split("none", list(range(n)), [], [], {})
