"""Expected data errors: a missing or damaged split, told as one line naming the path and the fix."""


class DataError(ValueError):
    """Shards or a manifest that cannot be used as they are: the message names the path and what to do."""
