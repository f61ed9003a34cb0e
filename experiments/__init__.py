"""Experiments that drive the mgsr library end to end (not part of the installed package)."""
