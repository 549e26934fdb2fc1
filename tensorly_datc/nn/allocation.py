"""Global rank allocation: spread a parameter (or MAC) budget over layers by error per cost.

Each layer gets a ladder of rank levels, from rank 1 up to the largest rank that still saves
cost. The relative metric error along the ladder is measured by short decompositions at a few
levels and interpolated in between (then made non-increasing). Starting from the lowest level
everywhere, the allocator repeatedly raises the layer whose next level buys the largest drop
of squared relative error per unit of cost, until no further step fits the budget. The squared
relative error of a layer is the fraction of its output energy lost, so the sum is a natural
total to minimise.
"""

import heapq
import logging
import math

import numpy as np
import torch
from torch import nn

from ._checks import check_layer, check_positive_int
from .factorize import factorise_layer, relative_errors
from .ranks import factorised_parameters

__all__ = ["allocate_ranks", "rank_ladder", "factorised_macs"]

logger = logging.getLogger(__name__)

UNITS = ("parameters", "macs")


def _output_size(module, input_size):
    """Return the spatial output size of a Conv2d for an input of ``input_size`` (H, W)."""
    if isinstance(module.padding, str):
        if module.padding == "same":
            return tuple(input_size)
        padding = (0, 0)
    else:
        padding = module.padding
    return tuple(
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            input_size, padding, module.dilation, module.kernel_size, module.stride
        )
    )


def factorised_macs(module, method, rank, input_size):
    """Return the MACs of the factorised form of ``module`` on one input of ``input_size``."""
    if isinstance(module, nn.Linear):
        return factorised_parameters("lowrank", tuple(module.weight.shape), rank)
    out_channels, in_channels, kernel_height, kernel_width = module.weight.shape
    in_pixels = math.prod(input_size)
    out_height, out_width = _output_size(module, input_size)
    out_pixels = out_height * out_width
    if method == "lowrank":
        return out_pixels * rank * (in_channels + out_channels)
    if method == "tucker2":
        rank_out, rank_in = rank
        return (in_pixels * in_channels * rank_in
                + out_pixels * (rank_in * rank_out * kernel_height * kernel_width + rank_out * out_channels))
    if method == "cp3":
        return in_pixels * in_channels * rank + out_pixels * rank * (
            kernel_height * kernel_width + out_channels)
    # cp4: the vertical depthwise convolution runs at the output height and input width.
    vertical_pixels = out_height * input_size[1]
    return (in_pixels * in_channels * rank + vertical_pixels * rank * kernel_height
            + out_pixels * rank * (kernel_width + out_channels))


def _original_cost(module, unit, input_size):
    weights = module.weight.numel()
    if unit == "parameters":
        return weights
    if isinstance(module, nn.Linear):
        return weights
    return math.prod(_output_size(module, input_size)) * weights


def rank_ladder(module, method, unit="parameters", input_size=None):
    """Return the rank levels of a layer whose cost is below the original's, and their costs.

    Tucker-2 levels keep the proportion of output and input channels; CP and low-rank levels
    are every rank from 1.
    """
    out_channels, in_channels = module.weight.shape[:2]
    original = _original_cost(module, unit, input_size)
    if method == "tucker2":
        steps = max(out_channels, in_channels)
        candidates = []
        for level in range(1, steps + 1):
            rank = (max(1, round(level * out_channels / steps)), max(1, round(level * in_channels / steps)))
            if not candidates or candidates[-1] != rank:
                candidates.append(rank)
    else:
        largest = min(out_channels, in_channels) if method == "lowrank" else original
        candidates = list(range(1, largest + 1))

    ladder = []
    for rank in candidates:
        if unit == "parameters":
            cost = factorised_parameters(method, tuple(module.weight.shape), rank)
        else:
            cost = factorised_macs(module, method, rank, input_size)
        if cost >= original:
            break
        ladder.append((rank, cost))
    return ladder


def _error_curve(module, method, ladder, second_moment, n_probes, options):
    """Return the relative metric error at every level, from decompositions at a few levels."""
    probes = sorted(set(np.linspace(0, len(ladder) - 1, min(n_probes, len(ladder))).round().astype(int)))
    measured = []
    for index in probes:
        _, approximation, _ = factorise_layer(module, method, ladder[index][0], second_moment,
                                              options=options)
        metric = None if second_moment is None else second_moment.to(approximation.device)
        error, frobenius = relative_errors(module.weight.detach(), approximation, metric)
        measured.append(frobenius if error is None else error)
    curve = np.interp(np.arange(len(ladder)), probes, measured)
    return np.minimum.accumulate(curve)


def allocate_ranks(layers, budget, *, statistics=None, unit="parameters", input_sizes=None,
                   n_probes=8, options=None):
    """Choose one rank per layer so that the total cost is at most ``budget`` times the original.

    Parameters
    ----------
    layers : list of (name, module, method)
        Layers to compress and their factorisation ('tucker2', 'cp4', 'cp3', 'lowrank').
    budget : float in (0, 1)
        Fraction of the layers' total original cost (weights or MACs) to keep.
    statistics : mapping of InputStatistics, optional
        Input statistics per layer; the errors are measured in their metric (Frobenius
        otherwise).
    unit : {'parameters', 'macs'}
        Cost to budget.
    input_sizes : mapping of (H, W), optional
        Spatial input size per layer; required for ``unit='macs'``.
    n_probes : int
        Decompositions per layer used to measure its error curve.
    options : dict, optional
        Passed to the decompositions of the probes (a few iterations are enough).

    Returns
    -------
    ranks : dict
        Layer name to rank. Every layer gets at least its lowest level (rank 1); no further
        step of any layer fits the remaining budget.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}; got {unit!r}")
    if not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(f"budget must be a fraction in (0, 1); got {budget!r}")
    if unit == "macs" and input_sizes is None:
        raise ValueError("unit='macs' needs the input size of each layer")
    n_probes = check_positive_int(n_probes, "n_probes")
    for name, module, method in layers:
        check_layer(module, f"layer {name!r}")
        if statistics is not None and name not in statistics:
            raise ValueError(f"statistics has no entry for layer {name!r}")
    input_sizes = input_sizes or {}
    ladders, curves, original_total, unchanged_total = {}, {}, 0, 0
    for name, module, method in layers:
        original_cost = _original_cost(module, unit, input_sizes.get(name))
        original_total += original_cost
        ladder = rank_ladder(module, method, unit, input_sizes.get(name))
        if not ladder:
            # The layer stays as it is, and its cost counts against the budget.
            logger.info("no rank of %s saves %s; it is left out of the allocation", name, unit)
            unchanged_total += original_cost
            continue
        second_moment = statistics[name].second_moment if statistics else None
        ladders[name] = ladder
        curves[name] = _error_curve(module, method, ladder, second_moment, n_probes, options) ** 2

    limit = budget * original_total
    levels = {name: 0 for name in ladders}
    spent = unchanged_total + sum(ladder[0][1] for ladder in ladders.values())
    if spent > limit:
        raise ValueError(
            f"budget {budget} allows {limit:.0f} {unit}, but rank 1 in every layer already "
            f"needs {spent}; raise the budget or compress fewer layers"
        )

    def push(heap, name):
        level = levels[name]
        if level + 1 < len(ladders[name]):
            gain = curves[name][level] - curves[name][level + 1]
            step = ladders[name][level + 1][1] - ladders[name][level][1]
            heapq.heappush(heap, (-gain / max(step, 1), step, name))

    heap = []
    for name in ladders:
        push(heap, name)
    while heap:
        _, step, name = heapq.heappop(heap)
        if spent + step > limit:
            continue
        spent += step
        levels[name] += 1
        push(heap, name)
    logger.info("allocated %.0f of %.0f %s (budget %.0f)", spent, original_total, unit, limit)
    return {name: ladders[name][level][0] for name, level in levels.items()}
