"""Errors that mean "the user gave us something we cannot use" (printed as one line, no traceback)."""


class UserError(Exception):
    """A bad file, path, value or combination; the message names it and says what to do."""


class ImageReadError(UserError):
    """An image file that is missing, unreadable, truncated, too small or too large."""
