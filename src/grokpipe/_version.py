"""The installed grokpipe version (recorded in every file grokpipe writes)."""

from importlib import metadata

try:
    __version__ = metadata.version("grokpipe")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
