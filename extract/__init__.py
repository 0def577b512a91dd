"""Stage one: a folder of clips becomes a cache of features (see avemo-extract).

    from extract import extract_folder
    manifest = extract_folder("clips/", "cache/", label_from="cremad")
"""
import importlib

__all__ = ["extract_folder", "read_manifest", "SettingsMismatch", "UsageError"]
_WHERE = {"extract_folder": "extract.run", "UsageError": "extract.run", "read_manifest": "extract.cache",
          "SettingsMismatch": "extract.cache"}


def __getattr__(name):
    # loaded on first use: `avemo-extract` starts its first worker before this process imports torch
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'extract' has no attribute {name!r}")
