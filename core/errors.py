"""Errors whose message is meant for the user: the CLI prints them on one line, the API as a 4xx."""


class UserError(ValueError):
    """Bad input or an impossible request; the message says what and, where it can, how to fix it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
