"""avemo: audio-visual emotion recognition from talking-face video.

Three stages, three commands: ``avemo-extract`` (clips -> cached features),
``avemo-train`` (cache -> fused model), ``avemo-predict`` (clip -> emotion).
"""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait steal the cores other jobs on a shared machine
# need (measured 2.2x slower under contention, see avemo/cpu.py); this must be set before
# torch loads OpenMP, and an explicit choice of the user's wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):
    # ``avemo.predict`` / ``avemo.load_model`` without making ``import avemo`` load torch and the extractor
    if name in ("predict", "load_model", "predict_timeline", "Prediction"):
        import importlib
        return getattr(importlib.import_module("avemo.prediction"), name)
    raise AttributeError(f"module 'avemo' has no attribute {name!r}")
