"""bgwatch: a hot-folder daemon that removes and replaces image backgrounds."""

__version__ = "0.1.0"
