"""Data layer: the DISC21 folder layout, one robust image loader, mini datasets, augmentations."""
