"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: a path, a file, a setting. The message names the culprit in one line."""


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), to quote in a
    UserError's one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_line(err: BaseException) -> str:
    """The one line that reports ``err``: a UserError's message; for anything else (a bug, an
    environment fault) its type and first line."""
    if isinstance(err, UserError):
        return f"error: {err}"
    return f"error: {type(err).__name__}: {first_line(err)}"
