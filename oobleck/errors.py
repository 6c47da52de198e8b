"""Errors that reach the user as one line (the CLI prints the message and exits with code 2)."""


class OobleckError(Exception):
    """Bad input or an impossible request: the message names the field, the value and the fix."""


class ConfigError(OobleckError):
    """A job config that cannot be loaded or validated."""
