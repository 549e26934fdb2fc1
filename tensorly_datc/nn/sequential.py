"""Sequential calibration: fit each layer to the inputs of the partially compressed model.

One-shot compression fits every layer to the original model's inputs, so the errors of the
layers before it are ignored and compound. Here the layers are compressed in forward order.
For layer ``l``, with ``x`` its input in the original model and ``x~`` its input in the model
whose earlier layers are already compressed (on the same images and patch positions),

    E || W x - W~ x~ ||^2 = || (W* - W~) Sigma~^{1/2} ||_F^2 + constant,
    Sigma~ = E[x~ x~^T],  C = E[x x~^T],  W* = W C Sigma~^{-1},

so the layer is fitted to the target ``W*`` in the metric ``Sigma~``: it corrects the upstream
error instead of ignoring it, in the manner of GPTQ-style layer-wise reconstruction.
"""

import copy
import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import as_second_moment, check_finite, check_layer
from .factorize import factorise_layer
from .statistics import (
    _accumulation_function,
    _iterate_inputs,
    _model_device,
    _resolve_batch_size,
)

__all__ = ["collect_cross_statistics", "sequential_target"]

logger = logging.getLogger(__name__)


class _InputCaptured(Exception):
    """Raised by a hook to stop a forward pass once the layer's input is recorded."""


def _capture_input(model, name, inputs):
    """Return the input of layer ``name`` when ``model`` runs on ``inputs`` (the rest is skipped)."""
    module = model.get_submodule(name)
    captured = {}

    def hook(module, args, kwargs):
        captured["input"] = (args[0] if args else kwargs["input"]).detach()
        raise _InputCaptured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(inputs)
    except _InputCaptured:
        pass
    finally:
        handle.remove()
    if "input" not in captured:
        raise ValueError(f"layer {name!r} was not called in the forward pass")
    return captured["input"]


class _CrossAccumulator:
    """Running float64 sums of ``x~ x~^T``, ``x x~^T`` and ``|W x|^2`` over stacked patches.

    Each row is ``[x, x~]``; the original input's own second moment is not needed, only the
    output energy ``|W x|^2`` that normalises the error, which costs ``T D`` per row instead of
    ``D^2``. Chunk products are formed as in :class:`_MomentAccumulator`.
    """

    def __init__(self, weight):
        self.weight = weight.reshape(weight.shape[0], -1)
        self.compressed_outer = None
        self.cross = None
        self.output_energy = 0.0
        self.count = 0

    def update(self, rows):
        product_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        rows = rows.to(product_dtype)
        size = rows.shape[1] // 2
        original, compressed = rows[:, :size], rows[:, size:]
        if self.cross is None:
            self.compressed_outer = rows.new_zeros((size, size), dtype=torch.float64)
            self.cross = rows.new_zeros((size, size), dtype=torch.float64)
        outer = (compressed.T @ compressed).to(torch.float64)
        self.compressed_outer += (outer + outer.T) / 2
        self.cross += (original.T @ compressed).to(torch.float64)
        outputs = original @ self.weight.to(product_dtype).T
        self.output_energy += float(torch.sum(outputs.to(torch.float64) ** 2))
        self.count += rows.shape[0]


def collect_cross_statistics(original, compressed, name, data, *, batch_size=None,
                             max_patches_per_chunk=4096):
    """Return the joint moments of layer ``name``'s inputs in two models.

    Both models run on the same batches, only as far as layer ``name``; the two inputs are
    stacked along the channel axis, so their patches are ``[x; x~]`` with the layer's own
    geometry.

    Returns
    -------
    cross_moment : torch.Tensor (D, D)
        ``C = E[x x~^T]``.
    compressed_moment : torch.Tensor (D, D)
        ``Sigma~ = E[x~ x~^T]``.
    output_energy : float
        ``E|W x|^2``, the mean squared output of the original layer (without bias).
    """
    modules = dict(original.named_modules())
    if name not in modules:
        raise ValueError(f"layer {name!r} is not in the model")
    module = modules[name]
    check_layer(module, f"layer {name!r}")
    accumulate = _accumulation_function(module)
    accumulator = _CrossAccumulator(module.weight.detach())
    batch_size = _resolve_batch_size(data, batch_size)
    device = _model_device(original)
    modes = [{m: m.training for m in model.modules()} for model in (original, compressed)]
    try:
        original.eval()
        compressed.eval()
        with torch.no_grad():
            for inputs in _iterate_inputs(data, batch_size):
                inputs = inputs if device is None else inputs.to(device)
                check_finite(inputs, "data")
                first = _capture_input(original, name, inputs)
                second = _capture_input(compressed, name, inputs)
                joint = torch.cat([first, second], dim=1 if first.ndim == 4 else -1)
                accumulate(accumulator, module, joint, max_patches_per_chunk)
    finally:
        for training_modes in modes:
            for submodule, training in training_modes.items():
                submodule.training = training
    if accumulator.count == 0:
        raise ValueError(f"layer {name!r} saw no calibration input")
    count = accumulator.count
    return (accumulator.cross / count, accumulator.compressed_outer / count,
            accumulator.output_energy / count)


def sequential_target(weight, cross_moment, compressed_moment, reg=1e-6):
    """Return ``W* = W C Sigma~^{-1}`` (with a ridge of ``reg`` times the mean eigenvalue)."""
    weight, cross_moment = (torch.as_tensor(np.asarray(value)) if isinstance(value, np.ndarray) else value
                            for value in (weight, cross_moment))
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float64)
    size = matrix.shape[1]
    check_finite(matrix, "weight")
    compressed_moment = as_second_moment(compressed_moment, size, "compressed_moment")
    if not isinstance(cross_moment, torch.Tensor) or tuple(cross_moment.shape) != (size, size):
        raise ValueError(f"cross_moment must be a tensor of shape ({size}, {size})")
    cross_moment = cross_moment.to(torch.float64)
    check_finite(cross_moment, "cross_moment")
    if float(torch.trace(compressed_moment)) == 0:
        raise ValueError("compressed_moment is zero: the layer's inputs in the compressed model are all zero")
    shift = reg * float(torch.trace(compressed_moment)) / size
    regularised = compressed_moment + shift * torch.eye(size, dtype=torch.float64, device=matrix.device)
    target = torch.linalg.solve(regularised, (matrix @ cross_moment).T).T
    return target.reshape(weight.shape)


def output_error(weight, approximation, moments):
    """Return the relative output error ``sqrt(E|W x - W~ x~|^2 / E|W x|^2)``."""
    cross_moment, compressed_moment, output_energy = moments
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float64)
    approx = approximation.reshape(matrix.shape).to(torch.float64)
    error = (output_energy - 2 * float(torch.sum((matrix @ cross_moment) * approx))
             + float(torch.sum((approx @ compressed_moment) * approx)))
    return math.sqrt(max(error, 0.0) / output_energy) if output_energy > 0 else 0.0


def factorise_sequentially(original, compressed, name, module, method, rank, data, *, norm,
                           batch_size, options):
    """Fit layer ``name`` of ``compressed`` to the original layer's output on its current inputs.

    Returns
    -------
    replacement : torch.nn.Sequential
    approximation : torch.Tensor (float64), shaped like the weight
    moments : (C, Sigma~, E|W x|^2)
    """
    moments = collect_cross_statistics(original, compressed, name, data, batch_size=batch_size)
    cross_moment, compressed_moment, _ = moments
    weight = module.weight.detach()
    if norm == "sigma" and float(torch.trace(compressed_moment)) > 0:
        target = sequential_target(weight, cross_moment, compressed_moment).to(weight.dtype)
        metric = compressed_moment
    else:
        target, metric = weight, None
    surrogate = copy.copy(module)
    surrogate._parameters = dict(module._parameters)
    surrogate._parameters["weight"] = torch.nn.Parameter(target, requires_grad=False)
    replacement, approximation, _ = factorise_layer(
        surrogate, method, rank, metric, name=name, options=options
    )
    return replacement, approximation, moments


def call_order(model, example, names):
    """Return ``names`` sorted by the order in which ``model`` calls the layers on ``example``."""
    order, handles = {}, []
    for name in names:
        def record(module, args, name=name):
            order.setdefault(name, len(order))
        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    training_modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training
    missing = [name for name in names if name not in order]
    if missing:
        raise ValueError(f"layers {missing} are not called in the model's forward pass")
    return sorted(names, key=order.__getitem__)


def sequential_fit(original, compressed, data, norm, batch_size, options):
    """Return the fitting function of sequential compression, for ``compress_layer``."""

    def fit(name, module, method, rank):
        replacement, approximation, moments = factorise_sequentially(
            original, compressed, name, module, method, rank, data, norm=norm,
            batch_size=batch_size, options=options,
        )
        weight = module.weight.detach()
        frobenius = float(torch.linalg.norm(weight.double() - approximation.to(weight.device))
                          / torch.linalg.norm(weight.double()).clamp_min(1e-300))
        error = output_error(weight, approximation.to(weight.device), moments)
        return replacement, error, frobenius, "metric err: output error against the original model"

    return fit
