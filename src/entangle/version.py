"""The package version (one place: the run directory records it)."""

__version__ = "0.1.0"
