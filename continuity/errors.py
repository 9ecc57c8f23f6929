"""The one exception type the CLI turns into a single line on stderr and exit status 2."""


class UsageError(ValueError):
    """Something the user asked for cannot be done as asked: bad option, unknown name, bad file.

    The message must say what was wrong and what would be accepted, because the CLI
    prints it alone, on one line.
    """
