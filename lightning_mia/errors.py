"""`UserError`: the base of every error that is the user's input, not a bug.

A command line (`train.py`, `attack.py`, `python -m lightning_mia.experiment`) shows a
`UserError` as one line on stderr — naming the file or value and what is wrong — and exits
with status 1, without a traceback. Each stage subclasses it (`DataError`, `CheckpointError`,
`AttackError`, ...), so the command lines need no list of error types.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a missing or malformed file, a value out of range, a mismatch of stages."""
