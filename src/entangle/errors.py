"""User-facing errors: each prints as one line on the command line, with no traceback."""


class EntangleError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(EntangleError, ValueError):
    """A configuration key or value is unknown or invalid."""


class DataError(EntangleError, ValueError):
    """A preference record is malformed; the message names the file, line and field."""


class ModelError(EntangleError):
    """A model or tokenizer could not be loaded."""


class TrainingError(EntangleError):
    """Training cannot continue (non-finite losses, an unusable run directory)."""


class OverBudget(EntangleError):
    """A command would exceed its memory budget (raised before the work, never after it)."""


class Interrupted(EntangleError):
    """A long command stopped by Ctrl-C (exit 130) or SIGTERM (143) after saving what it had."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.exit_code = 143 if signal_name == "SIGTERM" else 130
