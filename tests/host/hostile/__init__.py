"""Builders for hostile (and plain) layer tars: raw header bytes, so nothing is sanitized on the way."""
