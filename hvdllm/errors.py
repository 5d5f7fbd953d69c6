"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: a path, a file, a setting. The message names the culprit in one line."""


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), to quote in a
    UserError's one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
