"""User-facing errors: one sentence naming the problem and the fix, printed by the CLI without a traceback."""


class UserError(Exception):
    """Bad input the user can fix (a path, a file, a config, a mismatched checkpoint)."""


class CheckpointError(UserError):
    """A weights file is unreadable, incomplete or of another architecture."""


class ConfigError(UserError):
    """A config file or override names an unknown key or an unsupported value."""
