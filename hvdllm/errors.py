"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: a path, a file, a setting. The message names the culprit in one line."""
