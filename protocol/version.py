"""The one place the package version is written: packaging, ``--version`` and the
identity frame all read it from here."""

__version__ = "0.2.0"
