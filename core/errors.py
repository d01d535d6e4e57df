"""Errors a user can fix: they name the thing that is wrong and the fix.

`UserInputError` is what the CLI turns into a one-line message and exit code 2 (no traceback), and
what the nodes raise so ComfyUI shows the message in its error dialog.
"""


class UserInputError(ValueError):
    """Bad input from the user (a path, a photo, a model, an argument) with a message that says the fix."""


class ModelMismatchError(UserInputError):
    """Two things that must agree (a head and the features or conditioning it meets) do not."""


class NotEnoughMemoryError(UserInputError):
    """The device ran out of memory for what was asked (a batch, a size); the message says what to lower."""
