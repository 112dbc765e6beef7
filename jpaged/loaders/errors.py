"""The one error type loaders raise."""


class ModelLoadError(ValueError):
    """A model could not be loaded. The message names the file or path and the problem."""
