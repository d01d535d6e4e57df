"""The pack's version, kept in one place for pyproject, the CLI and checkpoint metadata."""

__version__ = "0.1.0"
