"""Plain-tensor maths on the GGN factor and its Gram matrix (no BackPACK import).

Users who hold their own factor ``V`` (shape ``[D, M]``, ``G = V Vᵀ``, Gram
matrix ``Vᵀ V`` of shape ``[M, M]``) and per-sample gradients can call these
directly.
"""

from vivitlib.linalg.derivatives import (
    directional_gammas,
    directional_lambdas,
    gradient_overlaps,
    signal_to_noise,
)
from vivitlib.linalg.eigh import (
    choose_eigh_dtype,
    default_rtol,
    eigenvalue_cutoff,
    gram_eigh,
    lift,
)
from vivitlib.linalg.gram import gram_matrix
from vivitlib.linalg.newton import newton_coefficients, newton_step, newton_step_sizes
from vivitlib.linalg.solve import inverse_ggn_product, inverse_weights

__all__ = [
    "choose_eigh_dtype",
    "default_rtol",
    "directional_gammas",
    "directional_lambdas",
    "eigenvalue_cutoff",
    "gradient_overlaps",
    "gram_eigh",
    "gram_matrix",
    "inverse_ggn_product",
    "inverse_weights",
    "lift",
    "newton_coefficients",
    "newton_step",
    "newton_step_sizes",
    "signal_to_noise",
]
