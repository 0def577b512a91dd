"""``avemo-train-audio``: pretrain the audio front-end on many speakers (``train.audio.cli.train_frontend``)."""
