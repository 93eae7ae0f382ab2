"""Stage 1: robust PCA of each weight into low-rank + sparse candidates, the calibration statistics it
weights them by, and its on-disk cache."""
