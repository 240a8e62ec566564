"""leanserve: make generative models lean, offline, and serve them fast."""

__version__ = "0.1.0"
