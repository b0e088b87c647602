"""Data: data sets, losses, groups and augmentation, and the training objective (with its
moment fast path)."""
