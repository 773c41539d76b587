"""Generic machinery shared by every method: configs, targets, layers, model operations, the file format."""
