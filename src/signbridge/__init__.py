"""signbridge: sign with the tools you know, with keys you never hold."""

__version__ = "0.1.0"
