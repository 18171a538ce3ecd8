"""The one cost model: which representation and contraction plan a factor uses.

Every choice between equivalent ways of computing with a layer's share of
``V`` is made here, from shapes alone, in multiply-adds (or stored entries for
memory). Shapes: ``C`` factor columns per sample, ``N`` samples, ``T``
positions sharing the weight (1 for a plain linear layer), ``O`` outputs and
``I`` inputs of the weight (``I = C_in · kernel size`` for convolutions).

* :meth:`CostModel.gram_plan` -- Gram matrix of an outer-product factor:
  ``'outer'`` (``T = 1``), ``'dense'`` (form ``V``) or ``'pairwise'``
  (input kernels per sample pair, cheap for layers with few positions);
* :meth:`CostModel.project_directly` -- projections onto ``K`` directions
  without forming ``V``;
* :meth:`CostModel.keep_dense` -- what to keep after the pass for lifting;
* :meth:`CostModel.prefer_factored` -- whether a layer keeps outer products at
  all rather than BackPACK's dense ``V``;
* :meth:`CostModel.send_factored` -- which form to exchange between ranks.

The active model is read with :func:`current_cost_model`; :func:`cost_model`
changes it for a block of code (e.g. to force a plan when testing it, or to
give the kernels a smaller chunk budget)::

    with cost_model(gram_plan="pairwise", chunk_elements=2**20):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

GRAM_PLANS = ("dense", "pairwise")


@dataclass(frozen=True)
class CostModel:
    """Settings of the cost model and the choices derived from them.

    Attributes:
        chunk_elements: Largest intermediate (entries) a contraction kernel may
            create beyond its outputs; ``2**24`` float32 entries = 64 MiB.
        workspace_elements: Size of the per-sample-pair products the pairwise
            kernel reuses on the CPU (small enough to stay in cache).
        materialise_elements: Largest slice of a weight-shared layer's dense
            ``V`` formed at a time by the ``'dense'`` plan when only its Gram
            block and ``Vᵀg`` are needed; ``2**23`` float32 entries = 32 MiB.
            The whole ``V`` is formed at once only when it is kept for lifting.
            Slices are made smaller where they stay wide (:meth:`slice_elements`).
        slice_inner: Entries per column a slice of ``V`` keeps at least when
            :meth:`slice_elements` makes it smaller than
            ``materialise_elements`` (narrower slices run the Gram product
            below GEMM speed).
        keep_dense_ratio: Keep the dense ``V`` of a weight-shared layer for
            lifting when it is at most this many times larger than its factors.
        lifted_vectors: How many vectors the factors kept after the pass
            will be applied to, if the caller knows (``1`` for a Newton step
            alone); ``None``: unknown, possibly many (eigenvectors). A known
            count lets :meth:`keep_dense` weigh forming the dense ``V`` against
            what it saves.
        gram_plan: Force ``'dense'`` or ``'pairwise'`` for weight-shared layers
            (``None``: cheapest by :meth:`gram_costs`).
        factored: Keep linear and convolution weights as outer products where
            :meth:`prefer_factored` says so (``False``: always BackPACK's
            dense ``V``).
    """

    chunk_elements: int = 2**24
    workspace_elements: int = 2**21
    materialise_elements: int = 2**23
    slice_inner: int = 4096
    keep_dense_ratio: float = 4.0
    lifted_vectors: int | None = None
    gram_plan: str | None = None
    factored: bool = True

    def __post_init__(self):
        if self.gram_plan is not None and self.gram_plan not in GRAM_PLANS:
            raise ValueError(
                f"gram_plan must be one of {GRAM_PLANS} or None, "
                f"got {self.gram_plan!r}."
            )
        for name in (
            "chunk_elements",
            "workspace_elements",
            "materialise_elements",
            "slice_inner",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        lifted = self.lifted_vectors
        if lifted is not None and (
            isinstance(lifted, bool) or not isinstance(lifted, int) or lifted < 0
        ):
            raise ValueError(
                f"lifted_vectors must be None or a non-negative int, got {lifted!r}."
            )

    @staticmethod
    def gram_costs(C: int, N: int, T: int, O: int, I: int) -> dict[str, int]:  # noqa: E741
        """Multiply-adds of each Gram plan of an outer-product factor.

        ``T = 1``: ``⟨v_cn, v_dm⟩ = ⟨s_cn, s_dm⟩ ⟨a_n, a_m⟩``, ``'outer'``
        ``(C·N)²·O / 2 + N²·I / 2``. Otherwise (see :mod:`.kernels`)

        * ``'dense'``: ``C·N·T·O·I + (C·N)²·O·I / 2``;
        * ``'pairwise'``: ``N²·T²·(I + C·O) / 2 + N²·C²·T·O / 2``.

        Both keep intermediates chunked, so memory does not enter the choice.
        """
        if T == 1:
            return {"outer": (C * N) ** 2 * O // 2 + N**2 * I // 2}
        return {
            "dense": C * N * T * O * I + (C * N) ** 2 * O * I // 2,
            "pairwise": (N * T) ** 2 * (I + C * O) // 2 + (N * C) ** 2 * T * O // 2,
        }

    @staticmethod
    def dense_gram_cost(C: int, N: int, D: int) -> int:
        """Multiply-adds of the Gram block of a dense ``[C, N, D]`` factor."""
        return (C * N) ** 2 * D // 2

    def gram_plan_for(self, C: int, N: int, T: int, O: int, I: int) -> str:  # noqa: E741
        """The plan used: ``'outer'`` for ``T = 1``, else forced or cheapest."""
        if T == 1:
            return "outer"
        if self.gram_plan is not None:
            return self.gram_plan
        costs = self.gram_costs(C, N, T, O, I)
        return min(costs, key=costs.get)

    def slice_elements(self, rows: int) -> int:
        """Largest slice of ``V`` (entries) the ``'dense'`` plan forms, ``rows = C·N``.

        Half of :attr:`materialise_elements` where the slices stay at least
        :attr:`slice_inner` entries wide, else as much as that width needs,
        never more than :attr:`materialise_elements`. On the DeepOBS nets at
        ``N = 64`` (``C·N = 576``) the half lowers the peak after a warm-up by
        about 14 % (3C3D 122 to 107 MiB, 2C2D 141 to 122, All-CNN-C 143 to
        123) in the same time; at ``N = 256`` the half would leave 1 820-entry
        slices and cost 3C3D 30 % more time, so the width keeps the whole.
        """
        full = self.materialise_elements
        return min(full, max(full // 2, rows * self.slice_inner))

    @staticmethod
    def project_directly(C: int, N: int, T: int, O: int, I: int, K: int) -> bool:  # noqa: E741
        """Whether projecting onto ``K`` directions is cheaper without forming ``V``.

        Directly ``K·N·T·O·I + C·N·T·O·K``; materialised ``C·N·T·O·I +
        C·N·O·I·K``. Weight sharing (``T > 1``) favours materialising, plain
        linear layers the direct path.
        """
        direct = K * N * T * O * I + C * N * T * O * K
        materialised = C * N * T * O * I + C * N * O * I * K
        return direct <= materialised

    def keep_dense(self, C: int, N: int, T: int, O: int, I: int) -> bool:  # noqa: E741
        """Whether to keep a weight-shared factor's dense ``V`` for lifting.

        Applying a dense ``V`` to ``K`` coefficient vectors costs ``K·C·N·O·I``,
        the outer form ``K·N·T·O·I`` plus ``K·C·N·T·O``; the dense form is kept
        when its memory is within :attr:`keep_dense_ratio` of the factors' and,
        if :attr:`lifted_vectors` gives ``K``, the outer form's extra work on
        the ``K`` vectors exceeds forming ``V`` (``C·N·T·O·I``; keeping it
        whole costs about that again in memory traffic: 3C3D's second
        convolution at ``N = 64``, a Newton step alone, 1.03 s instead of
        1.09 s without it, top-10 eigenvectors 1.10 s instead of 1.05 s).
        """
        if T == 1:
            return False
        factors = C * N * T * O + N * T * I
        if C * N * O * I > self.keep_dense_ratio * factors:
            return False
        if self.lifted_vectors is None:
            return True
        saved = N * T * O * I + C * N * T * O - C * N * O * I
        return self.lifted_vectors * saved > C * N * T * O * I

    def prefer_factored(self, C: int, N: int, T: int, O: int, I: int) -> bool:  # noqa: E741
        """Whether a linear/convolution weight keeps outer products at all.

        True unless switched off or the unfolded input ``N·T·I`` outweighs the
        dense factor ``C·N·O·I`` plus the backpropagated factor ``C·N·T·O``.
        """
        return self.factored and N * T * I <= C * N * O * I + C * N * T * O

    @staticmethod
    def send_factored(factored_numel: int, dense_numel: int) -> bool:
        """Whether to exchange a factor's outer pieces rather than its dense form."""
        return factored_numel <= dense_numel


# CostModel is frozen: the shared default cannot be mutated
_CURRENT: ContextVar[CostModel] = ContextVar(
    "vivitlib_cost_model",
    default=CostModel(),  # noqa: B039
)


def current_cost_model() -> CostModel:
    """The cost model in effect."""
    return _CURRENT.get()


@contextmanager
def cost_model(**settings) -> Iterator[CostModel]:
    """Use a cost model with changed ``settings`` (see :class:`CostModel`) in a block.

    Numbers do not change, only how they are computed (and so time and memory).

    Raises:
        TypeError: On an unknown setting.
        ValueError: On a bad value.
    """
    model = replace(current_cost_model(), **settings)
    token = _CURRENT.set(model)
    try:
        yield model
    finally:
        _CURRENT.reset(token)
