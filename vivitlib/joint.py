"""Several collectors in one backward pass, sharing the backpropagation they can.

Two collectors that ask for the same factor (same ``mc_samples`` and curvature
sub-sample, one process) get it from one backpropagation through the network,
and likewise for per-sample gradients with the same gradient sub-sample: one
extension computes the buffer, the joint hook hands the same object to every
collector that asked for it, and each frees it after reading (the last reader
frees it for good). Objects that are not collectors themselves (e.g. the
optimisers) take part through their ``curvature_collector`` attribute when
they have one, otherwise with their own extensions and hook, unshared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from backpack.utils.module_classification import is_loss
from torch.nn import Module

from vivitlib.collector import BackpackCollector
from vivitlib.extensions import BatchGradsExtension, GGNFactorExtension


class JointPass(NamedTuple):
    """Extensions and hook of several collectors sharing one backward pass."""

    extensions: tuple
    hook: Callable[[Module], None]


class _SharedOwner:
    """Owner of a shared extension: validates the module for every member."""

    def __init__(self, members: list[BackpackCollector]):
        self.members = members
        # the tightest memory budget of the members governs the shared work
        budgets = [m for m in members if m.max_memory is not None]
        self._budget_owner = min(
            budgets, key=lambda m: m.max_memory, default=members[0]
        )

    def run_extension(self, call, module: Module, g_inp: Any, g_out: Any) -> None:
        """Enter ``module`` for every member, run the extension once."""
        try:
            for member in self.members:
                member.enter_module(module, g_out)
            with (
                self.members[0].random_state(module),
                self._budget_owner.memory_scope(),
            ):
                call(module, g_inp, g_out)
        except Exception:
            for member in self.members:
                member.abort()
            raise


def _group_by(items: list, key: Callable) -> list[list]:
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _grad_key(collector: BackpackCollector) -> tuple | None:
    sub = collector.grad_subsampling
    return None if sub is None else tuple(sub)


def _shared_extensions(collectors: list[BackpackCollector]):
    """One factor extension per settings group, one grads extension likewise.

    Returns the extensions and ``(source field, [target fields])`` copies the
    hook makes so that every member finds the buffer under its own name.
    """
    extensions, copies = [], []
    for group in _group_by(collectors, lambda c: c.share_settings()):
        leader = group[0]
        ext = GGNFactorExtension(
            _SharedOwner(group),
            leader.mc_samples,
            leader.subsampling,
            savefield=leader.savefields[0],
            params=[p for member in group for p in member.params],
            deflate=leader.deflates,
        )
        extensions.append(ext)
        copies.append((leader.savefields[0], [c.savefields[0] for c in group[1:]]))
    with_grads = [c for c in collectors if c.needs_grads]
    for group in _group_by(with_grads, _grad_key):
        leader = group[0]
        ext = BatchGradsExtension(
            _SharedOwner(group), leader.grad_subsampling, savefield=leader.savefields[1]
        )
        extensions.append(ext)
        copies.append((leader.savefields[1], [c.savefields[1] for c in group[1:]]))
    return extensions, copies


def combine(*collectors: Any) -> JointPass:
    """Let several collectors (or optimisers) share one backward pass.

    Example::

        joint = vivitlib.combine(ggn, opt)
        with backpack(*joint.extensions, extension_hook=joint.hook):
            loss_fn(model(X), y).backward()

    Collectors with the same ``mc_samples`` and curvature sub-sample share one
    backpropagation of the factor; those with the same gradient sub-sample share
    the per-sample gradients. Each still accumulates its own results.
    Collectors whose curvature samples are chosen per pass (a ``subsampling``
    rule, e.g. :class:`~vivitlib.optim.DampedNewton`'s default) run their own
    extensions in the same pass.

    Args:
        collectors: Objects with ``extensions`` and ``hook`` (e.g.
            :class:`~vivitlib.LowRankGGN`, :class:`~vivitlib.DirectionalDerivatives`,
            :class:`~vivitlib.optim.DampedNewton`).

    Returns:
        The extensions to pass to ``backpack(...)`` and the joint hook.
    """
    units = [getattr(c, "curvature_collector", c) for c in collectors]
    local = [
        u
        for u in units
        if isinstance(u, BackpackCollector)
        and u.process_group is None
        and u.share_settings() is not None
    ]
    others = [u for u in units if not any(u is c for c in local)]
    extensions, copies = _shared_extensions(local)
    hooks = [u.hook for u in local + others]

    def hook(module: Module) -> None:
        if not is_loss(module):
            for param in module.parameters(recurse=False):
                for source, targets in copies:
                    if source in param.__dict__:
                        for target in targets:
                            param.__dict__[target] = param.__dict__[source]
        for each in hooks:
            each(module)

    extensions += [e for u in others for e in u.extensions]
    return JointPass(tuple(extensions), hook)
