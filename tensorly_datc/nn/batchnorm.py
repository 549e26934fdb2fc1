"""Re-estimation of BatchNorm running statistics after compression."""

import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_finite, check_module
from .statistics import _batch_count, _iterate_inputs, _model_device, _resolve_batch_size

__all__ = ["recalibrate_batchnorm"]

_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def recalibrate_batchnorm(model, data, *, batch_size=None, progress=True):
    """Re-estimate the running mean and variance of every BatchNorm layer on calibration data.

    A compressed layer changes the distribution of the activations that follow it, so the
    running statistics stored in later BatchNorm layers no longer match. This resets them and
    averages the batch statistics over ``data`` (a cumulative average, whatever the layers'
    momentum), running the model without gradients. Weights and biases are not changed, and the
    train/eval mode and momentum of every submodule are restored. The model is modified in
    place and returned.

    Parameters
    ----------
    model : torch.nn.Module
    data : tensor, DataLoader or iterable of batches
        Calibration inputs, in any form :func:`collect_input_statistics` takes.
    batch_size : int, optional
        Batch size when ``data`` is one tensor (64 by default). Batch statistics of larger
        batches are less noisy.
    progress : bool, default is True
        Show a progress bar over the batches.

    Returns
    -------
    torch.nn.Module
        ``model``.
    """
    check_module(model)
    layers = [module for module in model.modules() if isinstance(module, _BATCHNORM_TYPES)]
    if not layers:
        return model
    batch_size = _resolve_batch_size(data, batch_size)
    device = _model_device(model)
    training_modes = {module: module.training for module in model.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    saved = {layer: {key: value.clone() for key, value in layer.state_dict().items()} for layer in layers}
    try:
        model.eval()
        for layer in layers:
            if layer.track_running_stats:
                layer.reset_running_stats()
                layer.momentum = None
                layer.train()
        batches = _iterate_inputs(data, batch_size)
        total = _batch_count(data, batch_size)
        with torch.no_grad():
            for inputs in tqdm(batches, total=total, desc="BatchNorm statistics", disable=not progress):
                check_finite(inputs, "data")
                model(inputs if device is None else inputs.to(device))
    except BaseException:
        # Leave no half-updated running statistics behind.
        for layer, state in saved.items():
            layer.load_state_dict(state)
        raise
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, training in training_modes.items():
            module.training = training
    return model
