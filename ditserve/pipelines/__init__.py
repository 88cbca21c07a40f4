"""Pipelines: typed stages composed per model family, and the `_class_name` registry."""
