"""Argument checks shared by the nn functions; each error names the argument and the value."""

import numbers
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def check_module(model, name="model"):
    """Raise a TypeError unless ``model`` is a torch.nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}")


def check_layer(module, name="module"):
    """Raise a TypeError unless ``module`` is a Conv2d or Linear layer."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"{name} must be a torch.nn.Conv2d or torch.nn.Linear; got {type(module).__name__}")


def check_positive_int(value, name, allow_none=False):
    """Return ``value`` as an int after checking that it is an integer >= 1."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value}")
    return int(value)


def check_mapping(value, name):
    """Return a dict copy of ``value`` (None gives an empty dict), which must be a mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict; got {type(value).__name__}")
    return dict(value)


def check_bool(value, name):
    """Raise a TypeError unless ``value`` is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def check_names(value, name):
    """Return a list of layer names; a single string is rejected, since it is rarely meant."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of layer names, not a string; got {value!r}")
    try:
        return list(value)
    except TypeError as error:
        raise TypeError(f"{name} must be a list of layer names; got {value!r}") from error


def as_second_moment(matrix, size, name):
    """Return ``matrix`` as a float64 torch tensor after checking its shape and values."""
    if isinstance(matrix, np.ndarray):
        matrix = torch.from_numpy(np.array(matrix, dtype=np.float64))
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({size}, {size}); got {type(matrix).__name__}")
    if tuple(matrix.shape) != (size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}); got {tuple(matrix.shape)}")
    matrix = matrix.to(torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    scale = float(matrix.abs().max())
    if float((matrix - matrix.T).abs().max()) > 1e-8 * scale:
        raise ValueError(f"{name} must be symmetric")
    if float(torch.trace(matrix)) < 0:
        raise ValueError(f"{name} must be positive semi-definite; its trace is negative")
    return matrix


def check_finite(tensor, name):
    """Raise a ValueError if ``tensor`` holds NaN or infinite values."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
