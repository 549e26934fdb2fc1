"""Save a compressed model and load it back into a freshly built copy of the original model.

The file is a safetensors file: the compressed model's ``state_dict`` plus, in its metadata,
the structure (which layers were replaced, by which factorisation, at which rank). Loading
rebuilds that structure on an uncompressed model of the same architecture, then loads the
weights strictly. Nothing in the file is executed.
"""

import copy
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import cp_conv, low_rank_conv1x1, low_rank_linear, tucker2_conv

__all__ = ["save_compressed", "load_compressed", "rebuild_structure", "structure_of"]

_FORMAT = "tensorly_datc.compressed_model.v1"


def structure_of(report):
    """Return the replaced layers of a :class:`CompressionReport` as a list of dicts."""
    return [
        {"name": row.name, "method": row.method,
         "rank": list(row.rank) if isinstance(row.rank, (tuple, list)) else row.rank}
        for row in report.compressed
    ]


def _placeholder(module, method, rank):
    """Return a replacement stack with the right shapes and zero factors."""
    weight = module.weight
    zeros = {"dtype": weight.dtype, "device": weight.device}
    out_channels, in_channels = weight.shape[:2]
    if method == "tucker2":
        rank_out, rank_in = rank
        core = torch.zeros((rank_out, rank_in) + tuple(weight.shape[2:]), **zeros)
        factors = [torch.zeros(out_channels, rank_out, **zeros), torch.zeros(in_channels, rank_in, **zeros)]
        return tucker2_conv(module, core, factors)
    if method in ("cp4", "cp3"):
        spatial = list(weight.shape[2:]) if method == "cp4" else [weight.shape[2] * weight.shape[3]]
        factors = [torch.zeros(size, rank, **zeros) for size in [out_channels, in_channels] + spatial]
        return cp_conv(module, torch.ones(rank, **zeros), factors, layout=method)
    if method == "lowrank":
        left = torch.zeros(out_channels, rank, **zeros)
        right = torch.zeros(rank, in_channels, **zeros)
        if isinstance(module, nn.Linear):
            return low_rank_linear(module, left, right)
        return low_rank_conv1x1(module, left, right)
    raise ValueError(f"unknown factorisation method {method!r} in the model structure")


def rebuild_structure(model, structure):
    """Replace the layers listed in ``structure`` by factorised stacks of the right shapes.

    The factors of the new stacks are zeros; load a saved ``state_dict`` afterwards. ``model``
    is modified in place and returned.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built model of the architecture that was compressed.
    structure : list of dict
        As returned by :func:`structure_of`: ``name``, ``method`` and ``rank`` per layer.
    """
    modules = dict(model.named_modules())
    for entry in structure:
        name = entry["name"]
        if name not in modules:
            raise ValueError(f"layer {name!r} of the saved structure is not in the model")
        if not isinstance(modules[name], (nn.Conv2d, nn.Linear)):
            raise ValueError(
                f"layer {name!r} of the model is a {type(modules[name]).__name__}, not the "
                "Conv2d or Linear that was compressed; pass a freshly built, uncompressed model"
            )
        rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
        replacement = _placeholder(modules[name], entry["method"], rank)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return model


def save_compressed(model, report, path):
    """Save a compressed model's weights and structure to a safetensors file at ``path``."""
    if not hasattr(report, "compressed"):
        raise TypeError(f"report must be the CompressionReport returned by compress; got {type(report).__name__}")
    state = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    metadata = {"format": _FORMAT, "structure": json.dumps(structure_of(report))}
    save_file(state, os.fspath(path), metadata=metadata)


def load_compressed(model, path):
    """Load a model saved by :func:`save_compressed` into ``model``, an uncompressed copy.

    ``model`` must be a freshly built model of the original architecture; its listed layers
    are replaced in place and all weights loaded strictly (no missing or unexpected keys).

    Returns
    -------
    torch.nn.Module
        ``model``, now compressed, with the saved weights.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a compressed model saved by this library or is damaged, or
        ``model`` does not have the layers it describes.
    RuntimeError
        If the weights do not fit the rebuilt model (another architecture); ``model`` is then
        left unchanged.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"compressed model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a compressed model saved by tensorly_datc.nn.save_compressed")
    try:
        structure = json.loads(metadata["structure"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} has a damaged structure description") from error

    # Rebuild and load on a copy first, so a mismatch leaves ``model`` as it was.
    trial = rebuild_structure(copy.deepcopy(model), structure)
    trial.load_state_dict(state, strict=True)
    rebuild_structure(model, structure)
    model.load_state_dict(state, strict=True)
    return model
