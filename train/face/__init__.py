"""avemo-train-face: train and evaluate face-expression encoders on class-folder image datasets."""
