"""What users pass to the Hessian-free operators and algorithms, checked.

Operator inputs (model, parameters, loss reduction, data, batches, vectors)
and algorithm arguments (operator, sizes bounded by its dimension, start
vector, end of the spectrum). Generic checks (integers, floats, generators,
finite values) live in :mod:`vivitlib._checks`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from vivitlib._checks import check_finite

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
WHICH = ("largest", "smallest", "magnitude")


# ---- what an operator is built from and multiplied with --------------------
def check_model_state(model: nn.Module, built: bool = False) -> None:
    """Raise if a module of ``model`` makes products random or state-changing.

    Args:
        model: The model.
        built: Whether the operator already exists (checked before every
            product: the model may have been switched to train mode since).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If dropout with ``p > 0``, ``RReLU`` or batch norm (or
            instance norm tracking running statistics) is in train mode.

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    when = (
        "The model was put in train mode (model.train()) after the operator was "
        "built; call model.eval() again before computing products."
        if built
        else "Call model.eval() before building the operator."
    )
    for name, module in model.named_modules():
        if not module.training:
            continue
        if (isinstance(module, _DROPOUT) and module.p > 0) or isinstance(
            module, nn.RReLU
        ):
            raise ValueError(
                f"Module {name!r} ({type(module).__name__}) is in train mode: "
                f"products would be random (dropout in train mode). {when}"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm)
            and module.track_running_stats
        ):
            raise ValueError(
                f"Module {name!r} ({type(module).__name__}) is batch norm in train "
                "mode: products would depend on the batching and update running "
                f"statistics. {when}"
            )


def check_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    """Return the parameters to differentiate, validated against ``model``.

    Args:
        model: The model.
        params: ``None`` for all trainable parameters of ``model``, or a list
            of parameters of ``model``.

    Returns:
        List of parameters that require gradients.

    Raises:
        TypeError: If ``params`` is not an iterable of tensors.
        ValueError: If ``params`` is empty, repeats a tensor, contains a tensor
            that is not a parameter of ``model`` or does not require grad.

    """
    if params is None:
        result = [p for p in model.parameters() if p.requires_grad]
    else:
        if isinstance(params, Tensor) or not isinstance(params, Iterable):
            raise TypeError("params must be a list of tensors (or None for all).")
        result = list(params)
        if not all(isinstance(p, Tensor) for p in result):
            raise TypeError("params must contain only tensors.")
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for p in result):
            raise ValueError("params contains a tensor that is not a model parameter.")
        if len({id(p) for p in result}) != len(result):
            raise ValueError("params contains the same tensor twice.")
        if any(not p.requires_grad for p in result):
            raise ValueError("params contains a tensor with requires_grad=False.")
    if not result:
        raise ValueError("No parameters to differentiate (all frozen or empty list).")
    return result


def check_reduction(loss_fn: object, reduction: str | None) -> str:
    """Return the loss reduction, from ``reduction`` or ``loss_fn.reduction``.

    Raises:
        TypeError: If ``loss_fn`` is not callable.
        ValueError: If the reduction is unknown or not ``'mean'``/``'sum'``.

    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    own = getattr(loss_fn, "reduction", None)
    own = "mean" if own == "batchmean" else own  # KLDivLoss: mean over samples
    if reduction is None:
        reduction = own
    elif isinstance(own, str) and own != reduction:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={own!r}: the "
            "batches would be weighted for another loss than the one computed. "
            "Drop the reduction argument, or build the loss with "
            f"reduction={reduction!r}."
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"Loss reduction must be 'mean' or 'sum', got {reduction!r}. Use a "
            "loss module with that reduction or pass reduction='mean'|'sum'."
        )
    return reduction


def check_data(data: object) -> Iterable:
    """Return ``data`` as a re-iterable collection of ``(X, y)`` batches.

    Args:
        data: A ``DataLoader``, a list (or other re-iterable) of ``(X, y)``
            pairs, or one ``(X, y)`` pair of tensors.

    Returns:
        A re-iterable of ``(X, y)`` batches.

    Raises:
        TypeError: If ``data`` is a one-shot iterator or not iterable.
        ValueError: If ``data`` is a shuffling ``DataLoader``.

    """
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return [tuple(data)]
    if isinstance(data, DataLoader):
        batches = getattr(data, "batch_sampler", None)
        samplers = (data.sampler, batches, getattr(batches, "sampler", None))
        if any(isinstance(s, _RANDOM_SAMPLERS) for s in samplers):
            raise ValueError(
                "The data loader shuffles (random sampler): products must see the "
                "same batches every pass. Build it with shuffle=False."
            )
        return data
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a DataLoader, a list of (X, y) batches or one (X, y) "
            f"pair, got {type(data).__name__}."
        )
    if iter(data) is data:
        raise TypeError(
            "data is a one-shot iterator; products loop over the data many times. "
            "Pass a DataLoader or a list of (X, y) batches."
        )
    return data


def check_batch(index: int, batch: object, params: list[Tensor]) -> int:
    """Validate batch ``index`` of the data; return its number of samples.

    Args:
        index: Position of the batch (for the message).
        batch: An ``(X, y)`` pair: inputs (a tensor, or anything the model
            takes with ``len(y)`` samples) and targets.
        params: The operator's parameters (their dtype is compared with a
            floating ``X``).

    Raises:
        TypeError: If the batch is not an ``(X, y)`` pair, or a floating ``X``
            has another dtype than the parameters.
        ValueError: If ``X`` and ``y`` disagree on the number of samples or
            hold NaN or Inf.

    """
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise TypeError(
            f"Batch {index} is a {type(batch).__name__}"
            + (f" of {len(batch)} items" if isinstance(batch, tuple | list) else "")
            + ", not an (X, y) pair. Yield (inputs, targets) from the data (e.g. "
            "a collate_fn or a dataset returning two items)."
        )
    X, y = batch
    size = X.shape[0] if isinstance(X, Tensor) else len(y)
    if isinstance(X, Tensor) and isinstance(y, Tensor) and y.ndim:
        if y.shape[0] != size:
            raise ValueError(
                f"Batch {index}: X holds {size} samples but y holds "
                f"{y.shape[0]}; pass matching (X, y) pairs."
            )
    dtypes = {p.dtype for p in params}  # mixed-precision models: not checked
    if (
        isinstance(X, Tensor)
        and X.is_floating_point()
        and len(dtypes) == 1
        and (X.dtype not in dtypes)
    ):
        dtype = params[0].dtype
        raise TypeError(
            f"Batch {index}: X has dtype {X.dtype} but the parameters are {dtype}. "
            f"Convert the data (X.to({dtype})) or the model (model.to({X.dtype})) "
            "so that they agree."
        )
    for name, t in (("inputs X", X), ("targets y", y)):
        if isinstance(t, Tensor):
            check_finite(
                t,
                f"Batch {index}'s {name}",
                "Remove or impute the non-finite samples before building the operator.",
            )
    return size


def check_floating(v: Tensor) -> None:
    """Raise a ``TypeError`` unless ``v`` is a real floating-point tensor."""
    if not v.is_floating_point():
        raise TypeError(
            f"v must be a floating-point tensor, got dtype {v.dtype}: the product "
            "would be truncated to it. Convert v first, e.g. v.double()."
        )


# ---- arguments of the algorithms ------------------------------------------
def check_square_operator(op: object) -> int:
    """Return the dimension ``D`` of a square operator with a ``shape``.

    Raises:
        TypeError: If ``op`` has no two-dimensional ``shape``.
        ValueError: If ``op`` is not square.

    """
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2:
        raise TypeError(
            "op must be a square linear operator with a 2d shape (a vivitlib "
            f"operator, a torch matrix, a scipy LinearOperator), got {type(op)}."
        )
    if shape[0] != shape[1]:
        raise ValueError(f"op must be square, got shape {tuple(shape)}.")
    return int(shape[0])


def check_at_most_dim(value: int, name: str, dim: int, what: str = "D") -> None:
    """Raise a ``ValueError`` if ``value`` exceeds the operator dimension ``dim``.

    Args:
        value: The validated argument.
        name: Its name, as the user passed it.
        dim: The largest allowed value.
        what: How ``dim`` is described in the message (default ``'D'``).

    """
    if value > dim:
        raise ValueError(
            f"{name} must be at most {what}={dim} (the operator's dimension), got "
            f"{value}: a {dim}x{dim} operator has only {dim} eigenpairs and "
            f"independent directions. Pass {name} <= {dim}."
        )


def check_vector(v0: object, dim: int) -> Tensor:
    """Return a start vector ``v0`` of shape ``[dim]`` if it is finite and non-zero.

    Raises:
        ValueError: If ``v0`` is not a ``[dim]`` tensor, not finite or zero.

    """
    if not isinstance(v0, Tensor) or v0.shape != (dim,):
        raise ValueError(f"v0 must be a tensor of shape [{dim}].")
    check_finite(v0, "v0", "Pass a finite start vector.")
    if not bool(v0.any()):
        raise ValueError("v0 is zero; pass a non-zero start vector (or v0=None).")
    return v0


def check_which(which: object) -> str:
    """Return ``which`` if it names a supported end of the spectrum.

    Raises:
        ValueError: If ``which`` is not one of ``largest, smallest, magnitude``.

    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    return str(which)
