"""Error and warning classes raised by vivitlib, in one place.

Each subclasses the built-in exception users would catch anyway (``ValueError``,
``RuntimeError``, ``NotImplementedError``), so ``except ValueError`` keeps
working; catching the specific class lets code react without parsing messages.
"""

from __future__ import annotations


class NoPassError(RuntimeError):
    """Results were read before a complete curvature pass was collected."""


class IncompletePassError(RuntimeError):
    """A curvature pass ran but did not reach every parameter it needed."""


class UnsupportedError(NotImplementedError):
    """A layer, loss or option whose curvature the library cannot compute exactly."""


class StalePassWarning(UserWarning):
    """Results describe an earlier pass: a later ``backward()`` ran without them."""
