"""What every representation of a layer's share of ``V`` offers.

A :class:`Factor` holds one parameter's columns of the GGN factor ``V_p``
(``D_p`` rows, one column per factor column ``c`` and curvature sample ``n``);
a :class:`Grads` holds the same parameter's per-sample gradients. Consumers
(the Gram accumulation, lifting eigenvectors and Newton steps, projections onto
given directions, the exchange between ranks) use only these methods, so a
new representation is one new class and never a change to them.

Column order: every method takes and returns class-major ``(c, n)`` --
BackPACK's order, the only one inside the library. The public, sample-major
order is made once, when a block's results are finalised
(:mod:`vivitlib.block`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

#: ``fn(tensor, sample_axis) -> tensor``: a per-sample operation (selection,
#: gathering across ranks) applied to each stored tensor along its sample axis.
SampleMap = Callable[[Tensor, int], Tensor]


class Grads(ABC):
    """Per-sample gradients ``g_n`` of one parameter (``N'`` samples)."""

    #: Identifies the layer input the gradients were formed from (outer forms),
    #: so a factor with the same source can share work with them.
    source: object = None

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """``N'``."""

    @abstractmethod
    def total(self) -> Tensor:
        """Sum over samples, ``[D_p]``."""

    @abstractmethod
    def dense(self) -> Grads:
        """The gradients as a dense ``[N', D_p]`` representation."""

    @abstractmethod
    def project(self, directions: Tensor) -> Tensor:
        """``⟨g_n, d_k⟩`` for directions ``[K, *shape]``, ``[N', K]``."""

    @abstractmethod
    def scaled(self, scale: float) -> Grads:
        """The gradients times ``scale``."""

    @abstractmethod
    def map_samples(
        self, fn: SampleMap, source: object = None, input_like: Factor | None = None
    ) -> Grads:
        """Apply ``fn`` along the sample axis of every stored tensor.

        ``input_like``: a factor (already mapped) whose layer input these
        gradients share; its input is reused instead of mapped again.
        """

    @abstractmethod
    def stored_numel(self, input_shared: bool = False) -> int:
        """Entries stored (without the layer input when ``input_shared``)."""

    @abstractmethod
    def dense_numel(self) -> int:
        """Entries of the dense ``[N', D_p]`` form."""


class Factor(ABC):
    """One parameter's share ``V_p`` of the GGN factor, columns ``(c, n)``."""

    #: Identifies the layer input (outer forms), see :attr:`Grads.source`.
    source: object = None

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Dtype of the stored tensors."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the stored tensors."""

    @abstractmethod
    def contract(
        self, grads: Grads | None, keep: bool = False
    ) -> tuple[Tensor, Tensor | None, Factor | None]:
        """Gram block ``V_pᵀ V_p`` and ``V_pᵀ g_m``, sharing work between them.

        Args:
            grads: The parameter's per-sample gradients, or ``None``.
            keep: Whether to return the representation to keep for lifting.

        Returns:
            ``(gram, vtg, kept)``: ``[C, N, C, N]``, ``[C, N, N']`` (``None``
            without ``grads``) and what to keep (``None`` unless ``keep``).
        """

    @abstractmethod
    def times_grads(self, grads: Grads) -> Tensor:
        """``⟨v_cn, g_m⟩`` for every column and sample, ``[C, N, N']``."""

    @abstractmethod
    def apply(self, coeffs: Tensor) -> Tensor:
        """Lift ``coeffs`` ``[C, N, K]``: ``Σ_cn coeffs[c,n,k] v_cn``, ``[K, D_p]``."""

    @abstractmethod
    def project(self, directions: Tensor) -> Tensor:
        """``⟨v_cn, d_k⟩`` for directions ``[K, *shape]``, ``[C, N, K]``."""

    @abstractmethod
    def dense(self) -> Factor:
        """The factor as a dense ``[C, N, D_p]`` representation."""

    @abstractmethod
    def scaled(self, scale: float) -> Factor:
        """The factor times ``scale``."""

    @abstractmethod
    def map_samples(self, fn: SampleMap, source: object = None) -> Factor:
        """Apply ``fn`` along the sample axis of every stored tensor."""

    @abstractmethod
    def stored_numel(self) -> int:
        """Entries stored."""

    @abstractmethod
    def dense_numel(self) -> int:
        """Entries of the dense ``[C, N, D_p]`` form."""

    def shares_input(self, grads: Grads | None) -> bool:
        """Whether ``grads`` were formed from this factor's layer input."""
        return (
            grads is not None
            and self.source is not None
            and grads.source == self.source
        )
