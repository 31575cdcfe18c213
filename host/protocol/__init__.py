"""CPython implementations of the wire protocols (twins of the firmware's)."""
