"""entangle: margin-based preference optimisation that shows why log-probs move."""

__version__ = "0.1.0"

from entangle import losses  # noqa: E402,F401
from entangle.errors import ConfigError, DataError, EntangleError, ModelError, TrainingError  # noqa: E402,F401
