"""The package's version (the one ``pyproject.toml`` declares), importable from any layer."""

#: ``compiledopt.__version__``.
VERSION = "0.1.0"
