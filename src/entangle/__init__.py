"""entangle: margin-based preference optimisation that shows why log-probs move.

Installed as the distribution `entangle-po` (`pip install entangle-po[trl]`, or `pip install .` in a clone);
imported as `entangle`. The package index's `entangle` is an unrelated project with the same import name:
the two cannot share an environment, and importing this package where the other is installed stops with one line.
"""

from entangle.version import __version__  # noqa: E402,F401


def _refuse_namesake(paths=None) -> None:
    """One line (ImportError) when the unrelated distribution `entangle` is installed beside `entangle-po`:
    both write an `entangle/` package, and whichever came last has overwritten files of the other."""
    from importlib.metadata import PackageNotFoundError, distribution, distributions

    try:
        names = {d.metadata["Name"].lower().replace("_", "-") for d in distributions(path=paths)} if paths else \
            ({"entangle"} if distribution("entangle") else set())
    except PackageNotFoundError:
        return
    if "entangle" in names:
        raise ImportError("another package named 'entangle' (not entangle-po) is installed in this environment and "
                          "shares the import name: pip uninstall entangle, then pip install --force-reinstall "
                          "entangle-po")


_refuse_namesake()

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
