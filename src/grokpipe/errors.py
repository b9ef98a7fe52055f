"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class GrokpipeError(Exception):
    """A user-facing problem (bad config, damaged or hostile file, missing run, failed write)."""


class ConfigError(GrokpipeError):
    """A configuration value is missing, unknown or out of range; the message names the key."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key = key
        self.problem = problem
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': {problem} (keys: docs/configuration.md)")
