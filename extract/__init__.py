"""Stage one: a folder of clips becomes a cache of features (see avemo-extract)."""
