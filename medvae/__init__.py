"""medvae: scheduled augmentation and anomaly screening for medical images."""

from __future__ import annotations

__version__ = "0.1.0"
