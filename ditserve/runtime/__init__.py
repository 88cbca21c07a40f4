"""Engine, loader and the in-process Python API."""
