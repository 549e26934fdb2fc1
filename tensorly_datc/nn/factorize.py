"""Factorise one layer: decompose its weight in a metric and build the replacement stack."""

import logging
import math
import warnings

import numpy as np
import tensorly as tl
import torch
from torch import nn

from ..decomposition import weighted_parafac, weighted_tucker2
from ._checks import as_second_moment, check_finite, check_layer, check_mapping, check_positive_int
from .layers import cp_conv, low_rank_conv1x1, low_rank_linear, tucker2_conv
from .ranks import METHODS

__all__ = ["factorise_layer", "low_rank_factors", "relative_errors"]

logger = logging.getLogger(__name__)


def low_rank_factors(matrix, rank, second_moment=None):
    """Return ``(left, right)`` minimising ``||(W - left @ right) Sigma^{1/2}||_F`` in closed form.

    With ``Sigma = L L^T``, the best rank-``rank`` approximation of ``W L`` is
    ``U_R U_R^T W L``, where ``U_R`` holds the leading eigenvectors of ``W Sigma W^T``; so
    ``left = U_R`` and ``right = U_R^T W``, and no square root or inverse of ``Sigma`` is
    needed, even when it is singular.

    Parameters
    ----------
    matrix : torch.Tensor of shape (T, D)
    rank : int
    second_moment : torch.Tensor of shape (D, D), optional
        The metric; None means the Frobenius norm (a truncated SVD).

    Returns
    -------
    left : torch.Tensor of shape (T, rank)
    right : torch.Tensor of shape (rank, D)
    """
    if not isinstance(matrix, torch.Tensor):
        matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D (T, D); got shape {tuple(matrix.shape)}")
    matrix = matrix.to(torch.float64)
    check_finite(matrix, "matrix")
    rank = check_positive_int(rank, "rank")
    rank = min(rank, matrix.shape[0])
    if second_moment is not None:
        second_moment = as_second_moment(second_moment, matrix.shape[1], "second_moment")
        if float(torch.trace(second_moment)) == 0:
            raise ValueError("second_moment is zero; pass None for the Frobenius norm")
    weighted = matrix if second_moment is None else matrix @ second_moment.to(matrix)
    gram = weighted @ matrix.T
    _, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
    left = eigenvectors[:, -rank:].flip(1)
    return left, left.T @ matrix


def relative_errors(weight, approximation, second_moment=None):
    """Return (relative metric error or None, relative Frobenius error) of an approximation."""
    weight = weight.reshape(weight.shape[0], -1).to(torch.float64)
    residual = weight - approximation.reshape(weight.shape).to(torch.float64)
    frobenius = float(torch.linalg.norm(residual) / torch.linalg.norm(weight).clamp_min(1e-300))
    if second_moment is None:
        return None, frobenius
    metric = second_moment.to(weight)
    reference = float(torch.sum((weight @ metric) * weight))
    error = float(torch.sum((residual @ metric) * residual))
    if reference <= 0:
        return 0.0, frobenius
    return math.sqrt(max(error, 0.0) / reference), frobenius


def _weight_of(module):
    return module.weight.detach()


def _check_metric(second_moment, size, name):
    """Return the metric for a layer, or None (Frobenius) when the statistics are all zero."""
    if second_moment is None:
        return None
    second_moment = as_second_moment(second_moment, size, f"the input statistics of layer {name!r}")
    if float(torch.trace(second_moment)) <= 0:
        warnings.warn(
            f"the input statistics of layer {name!r} are all zero (the layer only saw zero "
            "inputs); fitting it in the Frobenius norm instead",
            stacklevel=3,
        )
        return None
    return second_moment


def factorise_layer(module, method, rank, second_moment=None, *, name="", options=None):
    """Decompose the weight of ``module`` and return its replacement and the approximation.

    Parameters
    ----------
    module : torch.nn.Conv2d or torch.nn.Linear
    method : {'tucker2', 'cp4', 'cp3', 'lowrank'}
        'lowrank' is for 1x1 convolutions and Linear layers.
    rank : int or (int, int)
        (R_T, R_S) for Tucker-2, an int otherwise.
    second_moment : torch.Tensor of shape (D, D), optional
        Second moment of the layer's input patches; None fits in the Frobenius norm.
    name : str
        Layer name, used in messages.
    options : dict, optional
        Passed to :func:`weighted_tucker2` or :func:`weighted_parafac`; ``random_state``
        defaults to 0.

    Returns
    -------
    replacement : torch.nn.Sequential
    approximation : torch.Tensor
        The approximated weight, shaped like ``module.weight``, in float64.
    second_moment : torch.Tensor or None
        The metric actually used (None after a Frobenius fallback).
    """
    # A fixed seed by default: the SVD start of CP draws random columns when the rank exceeds a
    # mode, and compression should be reproducible.
    check_layer(module)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    options = {"random_state": 0, **check_mapping(options, "options")}
    weight = _weight_of(module)
    check_finite(weight, f"the weight of layer {name!r}")
    metric = _check_metric(second_moment, weight[0].numel(), name)
    if metric is not None:
        metric = metric.to(weight.device)
    out_channels = weight.shape[0]

    if method == "lowrank":
        left, right = low_rank_factors(weight.reshape(out_channels, -1), rank, metric)
        approximation = (left @ right).reshape(weight.shape)
        if isinstance(module, nn.Linear):
            return low_rank_linear(module, left, right), approximation, metric
        return low_rank_conv1x1(module, left, right.reshape(rank, -1)), approximation, metric

    with tl.backend_context("pytorch", local_threadsafe=True):
        if method == "tucker2":
            (core, factors), _ = weighted_tucker2(weight, rank, metric, **options)
            approximation = tl.tenalg.multi_mode_dot(
                core.to(torch.float64), [f.to(torch.float64) for f in factors], modes=[0, 1]
            )
            return tucker2_conv(module, core, factors), approximation, metric

        target = weight if method == "cp4" else weight.reshape(out_channels, weight.shape[1], -1)
        cp_tensor = weighted_parafac(target, rank, metric, **options)
        weights, factors = cp_tensor
        approximation = tl.cp_to_tensor(
            (weights.to(torch.float64), [f.to(torch.float64) for f in factors])
        ).reshape(weight.shape)
        return cp_conv(module, weights, factors, layout=method), approximation, metric
