"""Datasets behind one call, ``build_data(name, root, ...) -> DataBundle``."""

from __future__ import annotations

from cascadec.data.bundle import DataBundle
from cascadec.data.registry import build_data, list_datasets

__all__ = ["DataBundle", "build_data", "list_datasets"]
