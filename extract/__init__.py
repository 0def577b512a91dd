"""Stage one: a folder of clips becomes a cache of features (see avemo-extract).

    from extract import extract_folder
    manifest = extract_folder("clips/", "cache/", label_from="cremad")
"""
from extract.cache import SettingsMismatch, read_manifest
from extract.run import UsageError, extract_folder

__all__ = ["extract_folder", "read_manifest", "SettingsMismatch", "UsageError"]
