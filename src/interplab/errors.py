"""The one exception type that user-facing code raises for bad input.

The CLI turns an `InterplabError` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""


class InterplabError(Exception):
    """Bad input or a state the user must fix: the message says what was wrong and what is valid."""
