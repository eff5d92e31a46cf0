"""The one exception type users see.

Every failure a user can cause raises `CalmEdgeError` (or a subclass) with a message that names
the file or value at fault and says how to fix it. The CLI prints the message without a
traceback and exits non-zero.
"""


class CalmEdgeError(Exception):
    """A failure caused by input the user can fix: a file, a value, a setting."""


class ConfigError(CalmEdgeError):
    """An invalid configuration file, preset name, key or value."""


class DataError(CalmEdgeError):
    """A missing, unreadable, corrupt or empty data file."""
