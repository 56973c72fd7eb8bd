"""entangle: margin-based preference optimisation that shows why log-probs move."""

from entangle.version import __version__  # noqa: E402,F401

from entangle import losses  # noqa: E402,F401
from entangle.errors import ConfigError, DataError, EntangleError, ModelError, TrainingError  # noqa: E402,F401


def __getattr__(name):
    """`entangle.generate`, `entangle.evaluate`, `entangle.label`, `entangle.scan` (api.py), `entangle.build`, `entangle.fit`, `entangle.train`,
    loaded on first use so that `import entangle` stays light."""
    if name in ("generate", "evaluate", "label", "scan"):
        from entangle import api

        return getattr(api, name)
    if name in ("build", "fit", "train"):
        from entangle import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'entangle' has no attribute {name!r}")
