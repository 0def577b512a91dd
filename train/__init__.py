"""Stage two and the face encoder: fit models from cached features or face images."""
