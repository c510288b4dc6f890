"""img_helper: the root side (device-mapper, extraction, the authorized Unix socket)."""

__version__ = "0.1.0"
