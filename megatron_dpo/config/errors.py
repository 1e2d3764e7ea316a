"""The one exception type for mistakes the user can fix in the config."""


class ConfigError(ValueError):
    """A config value or combination the user controls is wrong.

    The message names the key, the offending value, where it came from (file:line
    or the command-line override) and the fix, so the run can be corrected
    without reading our source.
    """
