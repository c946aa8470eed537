"""Errors that carry a message meant for the user.

Edges (the CLI, HTTP) catch :class:`UserError` and show its message as one line; anything
else is a bug and is allowed to fail loudly.
"""


class UserError(Exception):
    """Bad input or configuration; the message says what to fix."""


class DataError(UserError):
    """A dataset spec or its files are missing or malformed."""


class BundleError(UserError):
    """A model bundle is missing, malformed, tampered with, or does not fit."""


class ImageError(UserError):
    """An image payload could not be decoded or does not fit the model.

    ``status`` is the HTTP status the gateway answers with: 400 for bytes that do not
    decode or a wrong shape, 413 for too large, 415 for an unsupported type.
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
