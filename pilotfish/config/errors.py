"""Config errors that name the path of the offending field."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; ``path`` names the field, e.g. ``clusters[0].endpoints[1]``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message
