"""The package version (read by pyproject.toml, `nti --version` and every artifact's record)."""
__version__ = "0.1.0"
