"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A problem with the user's data files or data settings; the message names
    the place (file:line or file row i, and the key) and the fix."""
