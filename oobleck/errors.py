"""Errors that reach the user as one line (the CLI prints the message and exits with code 2), and the
function that makes any message one line."""

from __future__ import annotations

import re


class OobleckError(Exception):
    """Bad input or an impossible request: the message names the field, the value and the fix."""


class ConfigError(OobleckError):
    """A job config that cannot be loaded or validated."""


def one_line(message: str, limit: int = 1000) -> str:
    """A message as one line: a wrapped error from a library (torch's unpickling errors span several
    lines) is joined with "; ", terminal escapes and control characters are dropped, and an absurdly
    long one is cut."""
    message = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", message)  # terminal colours (torch bolds its advice)
    message = "".join(c if c.isprintable() or c in "\n\r" else " " for c in message)
    text = "; ".join(part.strip() for part in message.splitlines() if part.strip()) or "(no message)"
    return text if len(text) <= limit else text[: limit - 3] + "..."
