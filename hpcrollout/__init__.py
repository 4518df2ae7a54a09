"""hpcrollout: n sampled responses per chat prompt, at cluster scale, resumable and exactly-once."""

from __future__ import annotations

__version__ = "0.1.0"
