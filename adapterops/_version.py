"""The version, in a leaf module: everything below the package root imports it from here."""

__version__ = "0.1.0"
