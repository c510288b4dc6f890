"""`img daemon` (the implementation lives in img.daemon)."""

from img.daemon import daemon

__all__ = ["daemon"]
