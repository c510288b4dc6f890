"""img: the unprivileged side of the container image manager (CLI, FSM engine, store, S3)."""

__version__ = "0.1.0"
