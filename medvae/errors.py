"""The errors medvae raises on purpose: each message is one line that says what is wrong and what to do.

The command line prints them as they are (no traceback unless ``--debug``); anything else that escapes
is a bug.
"""

from __future__ import annotations


class MedvaeError(RuntimeError):
    """Base of medvae's expected failures; ``str(exc)`` is the one-line message for the operator."""


class StoreError(MedvaeError):
    """The store cannot be opened, read or written; the message says what to do."""


class ModelDirError(MedvaeError):
    """A model directory is missing, incomplete, modified after it was written, or not authentic."""
