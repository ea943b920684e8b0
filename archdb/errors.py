"""The root of archopt's user-facing errors: the CLI prints any of them as one line."""


class ArchoptError(Exception):
    """An error whose message is meant for the user as it is (one line)."""
