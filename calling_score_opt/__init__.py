"""cso: train, search, export and ship the app's calling-score model."""

from __future__ import annotations

__version__ = "0.2.0"
