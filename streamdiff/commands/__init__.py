"""Subcommands of the ``streamdiff`` CLI, one module each (see :mod:`streamdiff.cli`)."""
