"""Rank selection: the largest ranks that keep a factorised layer within a parameter ratio.

Parameter counts of the factorised forms of a layer with weight (T, S, kh, kw), K = kh * kw:

* Tucker-2: ``S R_S + R_S R_T K + R_T T``
* CP-4: ``R (S + kh + kw + T)``; CP-3: ``R (S + K + T)``
* low rank (1x1 convolution, Linear): ``R (S + T)``

Biases are the same before and after, so they are left out of the ratio.
"""

import math
import numbers

__all__ = ["factorised_parameters", "ranks_for_ratio", "METHODS"]

METHODS = ("tucker2", "cp4", "cp3", "lowrank")


def _check_shape(weight_shape):
    """Return ``weight_shape`` as a tuple of positive ints of length 2 or 4."""
    try:
        shape = tuple(weight_shape)
    except TypeError as error:
        raise TypeError(f"weight_shape must be a tuple such as (T, S, kh, kw); got {weight_shape!r}") from error
    valid = len(shape) in (2, 4) and all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1 for size in shape
    )
    if not valid:
        raise ValueError(
            f"weight_shape must be (T, S) or (T, S, kh, kw) of positive ints; got {weight_shape!r}"
        )
    return tuple(int(size) for size in shape)


def _is_positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_method_rank(method, rank):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "tucker2":
        if not (isinstance(rank, (tuple, list)) and len(rank) == 2):
            raise TypeError(f"a Tucker-2 rank must be a pair (out_rank, in_rank); got {rank!r}")
        if not all(map(_is_positive_int, rank)):
            raise ValueError(f"a Tucker-2 rank must be a pair of positive ints; got {rank!r}")
    elif isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"a {method} rank must be an int; got {rank!r}")
    elif rank < 1:
        raise ValueError(f"a {method} rank must be a positive int; got {rank!r}")


def factorised_parameters(method, weight_shape, rank):
    """Return the number of weights of the factorised form of a layer.

    Parameters
    ----------
    method : {'tucker2', 'cp4', 'cp3', 'lowrank'}
    weight_shape : tuple of int
        (T, S, kh, kw) for a convolution, (T, S) for a Linear layer.
    rank : int or (int, int)
        (R_T, R_S) for Tucker-2, an int otherwise.

    Examples
    --------
    >>> factorised_parameters('tucker2', (64, 32, 3, 3), (16, 8))
    2432
    >>> factorised_parameters('cp4', (64, 32, 3, 3), 10)
    1020
    """
    weight_shape = _check_shape(weight_shape)
    _check_method_rank(method, rank)
    out_channels, in_channels = weight_shape[:2]
    kernel = tuple(weight_shape[2:]) or (1, 1)
    n_taps = math.prod(kernel)
    if method == "tucker2":
        rank_out, rank_in = rank
        return in_channels * rank_in + rank_in * rank_out * n_taps + rank_out * out_channels
    if method == "cp4":
        return rank * (in_channels + sum(kernel) + out_channels)
    if method == "cp3":
        return rank * (in_channels + n_taps + out_channels)
    if method == "lowrank":
        return rank * (in_channels + out_channels)
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def ranks_for_ratio(method, weight_shape, param_ratio):
    """Return the largest ranks whose factorised form keeps at most ``param_ratio`` of the weights.

    Tucker-2 ranks keep the proportion of the channels, ``R_T / T = R_S / S``, which makes the
    parameter count a quadratic in that proportion; the ranks are then raised one at a time,
    output rank first, while the budget allows. Every rank is at least 1, so a very small ratio
    can give a layer slightly above it (the caller compares with the original and may skip).

    Examples
    --------
    >>> ranks_for_ratio('tucker2', (64, 64, 3, 3), 0.5)
    (39, 38)
    >>> ranks_for_ratio('cp4', (64, 64, 3, 3), 0.5)
    137
    """
    if not isinstance(param_ratio, (int, float)) or not 0 < param_ratio or math.isinf(param_ratio):
        raise ValueError(f"param_ratio must be a number > 0; got {param_ratio!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    weight_shape = _check_shape(weight_shape)
    out_channels, in_channels = weight_shape[:2]
    budget = param_ratio * math.prod(weight_shape)
    if method != "tucker2":
        per_rank = factorised_parameters(method, weight_shape, 1)
        return max(1, int(budget // per_rank))

    n_taps = math.prod(weight_shape[2:]) if len(weight_shape) > 2 else 1
    quadratic = out_channels * in_channels * n_taps
    linear = out_channels**2 + in_channels**2
    proportion = (-linear + math.sqrt(linear**2 + 4 * quadratic * budget)) / (2 * quadratic)
    rank_out = min(out_channels, max(1, math.floor(proportion * out_channels)))
    rank_in = min(in_channels, max(1, math.floor(proportion * in_channels)))

    def fits(rank_out, rank_in):
        return factorised_parameters(method, weight_shape, (rank_out, rank_in)) <= budget

    # Lifting a rank to 1 can break the budget; lower the other rank while it is above 1.
    while not fits(rank_out, rank_in) and max(rank_out, rank_in) > 1:
        if rank_out / out_channels >= rank_in / in_channels and rank_out > 1:
            rank_out -= 1
        elif rank_in > 1:
            rank_in -= 1
        else:
            rank_out -= 1

    grown = True
    while grown:
        grown = False
        if rank_out < out_channels and fits(rank_out + 1, rank_in):
            rank_out, grown = rank_out + 1, True
        if rank_in < in_channels and fits(rank_out, rank_in + 1):
            rank_in, grown = rank_in + 1, True
    return rank_out, rank_in
