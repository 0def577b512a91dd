"""avemo: audio-visual emotion recognition from talking-face video.

Three stages, three commands: ``avemo-extract`` (clips -> cached features),
``avemo-train`` (cache -> fused model), ``avemo-predict`` (clip -> emotion).
"""

__version__ = "0.1.0"
