"""Errors a user can cause (bad config, data, files). The CLI prints them as one line and exits 2."""


class PeftkitError(ValueError):
    """Base of errors caused by user input; the message names the file, line or field."""


class ConfigError(PeftkitError):
    """A config value or key is wrong."""


class DataError(PeftkitError):
    """A data file is missing, malformed, or has wrong fields."""


class AdapterFileError(PeftkitError):
    """An adapter folder is missing, malformed, or does not fit the model."""


class NotMergeableError(PeftkitError, TypeError):
    """A method whose adapter cannot be folded into the base weights was asked to merge."""


class TrainingError(PeftkitError):
    """Training cannot go on (e.g. the loss became NaN)."""
