"""One exception type for everything a user can get wrong.

The CLI prints ``ClpoisonError`` as a single line (no traceback); the message must say what is
wrong *and* how to fix it.
"""


class ClpoisonError(Exception):
    """A user-facing error: bad input, missing data, mismatched files."""
