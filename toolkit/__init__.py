"""bookgen-kit: offline forensics and recovery toolkit for the BookGen service."""

__version__ = "0.1.0"
