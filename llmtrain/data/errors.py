"""The data pipeline's error type (kept apart so every data module can raise it without cycles)."""


class DataError(ValueError):
    """Bad data on disk or a data setting that does not match it: the message names the file or key."""
