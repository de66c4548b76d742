"""The error type of bad user input. Every command catches it at the top (launch/cli.py) and prints one line on
stderr, exit status 2, never a traceback; ConfigError (launch/config.py) and RunError (launch/restore.py) are
kinds of it."""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""
