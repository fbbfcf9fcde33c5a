"""Single source of the package version (read statically by setuptools; see pyproject.toml)."""

__version__ = "0.1.0"
