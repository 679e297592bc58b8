"""Data: one record type, loaders for each format, the synthetic set, images, splits."""
