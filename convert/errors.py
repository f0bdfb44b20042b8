"""The one exception type for errors a user can cause (bad paths, configs, options, files).

The CLI prints its message on one line and exits with `exit_code`; library callers catch it.
"""


class ConvertError(Exception):
    """A user-facing error with a one-line message."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message.replace("\n", " "))
        if exit_code is not None:
            self.exit_code = exit_code
