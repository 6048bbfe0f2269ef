"""The one error type the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""
