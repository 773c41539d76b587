"""Training: config, data, the loop, checkpoints, evaluation.

`deltatune.train` is this package and, called, the loop's `train()`: `dt.train(...)` and
`import deltatune.train.evaluate` both work (a function exported under the package's name would hide it).
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """The package `deltatune.train`, callable as `deltatune.train.loop.train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
