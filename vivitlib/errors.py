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


class DisconnectedLossError(RuntimeError):
    """BackPACK reached a module without a curvature signal from the loss.

    The loss is not extended, or a functional operation between two modules
    (or between the model and the loss) cut BackPACK's chain.
    """


class StalePassWarning(UserWarning):
    """Results describe an earlier pass: a later ``backward()`` ran without them."""
