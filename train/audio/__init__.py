"""``avemo-train-audio``: pretrain the audio front-end on many speakers (see ``train.audio.cli``)."""
from train.audio.cli import train_frontend

__all__ = ["train_frontend"]
