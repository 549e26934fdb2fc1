"""Whole-model compression: choose layers and ranks, factorise each layer, report."""

import copy
import logging
import numbers
import warnings
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_bool, check_mapping, check_module, check_names, check_positive_int
from ._counting import conv_macs, count_parameters
from .factorize import factorise_layer, relative_errors
from .ranks import factorised_parameters, ranks_for_ratio
from .report import CompressionReport, LayerReport
from .allocation import allocate_ranks
from .distributed import distribute_layers, resolve_distributed
from .sequential import call_order, sequential_fit
from .statistics import InputStatistics, collect_input_statistics

__all__ = ["compress", "compress_layer", "one_shot_fit", "select_layers"]

logger = logging.getLogger(__name__)

CONV_METHODS = ("tucker2", "cp4", "cp3")
NORMS = ("sigma", "frobenius")
CALIBRATIONS = ("one-shot", "sequential")


def _describe(module):
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}, {module.out_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "x".join(str(k) for k in module.kernel_size)
        extra = f", groups={module.groups}" if module.groups > 1 else ""
        return f"{type(module).__name__}({module.in_channels}, {module.out_channels}, {kernel}{extra})"
    return type(module).__name__


def _skip_reason(module, named):
    """Return why ``module`` cannot be compressed, or None if it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups > 1:
            return (f"grouped convolution (groups={module.groups}) is not supported; "
                    "left unchanged")
        return None
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} is not supported (only Conv2d and Linear); left unchanged"
    if named:
        return f"{type(module).__name__} has no weight to factorise; left unchanged"
    return None


def select_layers(model, layers=None, exclude=()):
    """Return the layers to compress and the skipped ones, each as ``(name, module, reason)``.

    Parameters
    ----------
    model : torch.nn.Module
    layers : None, 'all' or iterable of str
        None: every ``Conv2d`` with a kernel larger than 1x1 and ``groups == 1``. 'all': also
        1x1 convolutions and ``Linear`` layers. A list of names selects those layers.
    exclude : iterable of str
        Names to leave out.

    Returns
    -------
    targets : list of (name, module)
    skipped : list of (name, module, reason)
    """
    check_module(model)
    modules = dict(model.named_modules())
    exclude = set(check_names(exclude, "exclude"))
    unknown = sorted(exclude - set(modules))
    if unknown:
        raise ValueError(f"exclude: no layer named {unknown} in the model")

    if layers is None or layers == "all":
        names = [name for name, module in modules.items()
                 if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))]
        named = False
    elif isinstance(layers, str):
        raise ValueError(f"layers must be None, 'all' or a list of layer names; got {layers!r}")
    else:
        names = check_names(layers, "layers")
        unknown = sorted(set(names) - set(modules))
        if unknown:
            raise ValueError(f"layers: no layer named {unknown} in the model")
        named = True

    targets, skipped = [], []
    for name in names:
        module = modules[name]
        if name in exclude:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                skipped.append((name, module, "excluded by the caller"))
            continue
        reason = _skip_reason(module, named)
        if reason is None and not named and layers is None:
            if isinstance(module, nn.Linear):
                reason = "Linear layers are compressed only with layers='all' or by name"
            elif tuple(module.kernel_size) == (1, 1):
                reason = "1x1 convolutions are compressed only with layers='all' or by name"
        if reason is None:
            targets.append((name, module))
        else:
            skipped.append((name, module, reason))
    return targets, skipped


def _check_input_size(input_size):
    """Return ``input_size`` as a tuple of positive ints, the shape of one input sample."""
    if input_size is None:
        return None
    if isinstance(input_size, str) or not isinstance(input_size, (tuple, list)):
        raise TypeError(f"input_size must be a tuple such as (3, 32, 32); got {input_size!r}")
    if len(input_size) < 2 or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1
        for size in input_size
    ):
        raise ValueError(
            "input_size must be the shape of one sample without the batch dimension, such as "
            f"(3, 32, 32); got {input_size!r}"
        )
    return tuple(int(size) for size in input_size)


def _check_data(data):
    """Reject calibration data that is empty or not finite (it would silently give no statistics)."""
    if isinstance(data, torch.Tensor):
        if data.shape[0] == 0:
            raise ValueError("data is an empty tensor; pass at least one calibration input")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or infinite values")
    elif isinstance(data, (list, tuple)) and len(data) == 0:
        raise ValueError("data is an empty list; pass at least one calibration batch")


def _method_for(module, method):
    if isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1):
        return "lowrank"
    return method


def _check_rank(name, method, rank, module):
    if isinstance(rank, (tuple, list)):
        rank = tuple(int(r) if isinstance(r, np.integer) else r for r in rank)
    elif isinstance(rank, np.integer):
        rank = int(rank)
    if method == "tucker2":
        if (not isinstance(rank, (tuple, list)) or len(rank) != 2
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank)):
            raise ValueError(
                f"ranks[{name!r}] must be a pair (out_rank, in_rank) of ints >= 1 for Tucker-2; "
                f"got {rank!r}"
            )
        rank_out, rank_in = (min(r, size) for r, size in zip(rank, module.weight.shape[:2]))
        # As weighted_tucker2 does, lower a rank above the other rank times the kernel taps,
        # which adds nothing, so the report and saved structure match the layers built.
        n_taps = math.prod(module.weight.shape[2:])
        rank_out = min(rank_out, rank_in * n_taps)
        rank_in = min(rank_in, rank_out * n_taps)
        if (rank_out, rank_in) != tuple(rank):
            logger.info("Tucker-2 rank of %s lowered from %s to %s to fit the layer's shape",
                        name, tuple(rank), (rank_out, rank_in))
        return rank_out, rank_in
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"ranks[{name!r}] must be an int >= 1 for {method}; got {rank!r}")
    return rank


def _input_sizes(model, example, names):
    """Return the spatial input size of each named layer for one forward pass of ``example``."""
    sizes, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def record(module, inputs, name=name):
            sizes[name] = tuple(inputs[0].shape[-2:])
        handles.append(modules[name].register_forward_pre_hook(record))
    training_modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for module, training in training_modes.items():
            module.training = training
        for handle in handles:
            handle.remove()
    return sizes


def _first_example(data, input_size, model):
    """Return one input sample (batch of 1) for counting MACs and call order, or None."""
    parameter = next(iter(model.parameters()), torch.empty(0))
    device = parameter.device
    if input_size is not None:
        dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
        return torch.zeros((1,) + tuple(input_size), device=device, dtype=dtype)
    if isinstance(data, torch.Tensor):
        return data[:1].to(device)
    if data is None or isinstance(data, Mapping) or iter(data) is data:
        # A one-pass iterator was already consumed by the statistics.
        return None
    batch = next(iter(data), None)
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return batch[:1].to(device) if isinstance(batch, torch.Tensor) else None


def _macs(module, size):
    if size is None:
        return None
    return conv_macs(module, size) if not isinstance(module, nn.Linear) else conv_macs(module)


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_options(method, norm, calibration, param_ratio, ranks, budget_unit="parameters"):
    if budget_unit not in ("parameters", "macs"):
        raise ValueError(f"budget_unit must be one of ('parameters', 'macs'); got {budget_unit!r}")
    if method not in CONV_METHODS:
        raise ValueError(f"method must be one of {CONV_METHODS}; got {method!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}; got {calibration!r}")
    if param_ratio is not None and (
        isinstance(param_ratio, bool) or not isinstance(param_ratio, (int, float))
        or not 0 < param_ratio <= 1
    ):
        raise ValueError(f"param_ratio must be a number in (0, 1]; got {param_ratio!r}")
    if ranks is not None and not isinstance(ranks, Mapping):
        raise TypeError(f"ranks must be a mapping from layer name to rank; got {type(ranks).__name__}")


def _statistics_for(model, data, targets, norm, progress, batch_size, sizes_hook_names,
                    distributed=False):
    """Return (statistics or None, input sizes) for the target layers."""
    names = [name for name, _ in targets]
    if data is None:
        if norm == "sigma":
            raise ValueError("data is required for norm='sigma': pass calibration inputs or statistics")
        return None, {}
    if isinstance(data, Mapping):
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"the statistics mapping has no entry for layers {missing}")
        bad = [name for name in names if not isinstance(data[name], InputStatistics)]
        if bad:
            raise TypeError(f"statistics for layers {bad} are not InputStatistics objects")
        return dict(data), {}

    # Record each layer's spatial input size during the same pass, for the MAC counts.
    sizes, handles = {}, []
    modules = dict(model.named_modules())
    for name in sizes_hook_names:
        def record(module, inputs, name=name):
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))
        handles.append(modules[name].register_forward_pre_hook(record))
    try:
        statistics = collect_input_statistics(
            model, data, layers=names, progress=progress, batch_size=batch_size,
            distributed=distributed,
        )
    finally:
        for handle in handles:
            handle.remove()
    return statistics, sizes


def compress(
    model,
    data=None,
    *,
    method="tucker2",
    param_ratio=None,
    ranks=None,
    layers=None,
    exclude=(),
    norm="sigma",
    calibration="one-shot",
    inplace=False,
    progress=True,
    input_size=None,
    require_fewer_macs=False,
    batch_size=None,
    decomposition_options=None,
    budget=None,
    budget_unit="parameters",
    distributed=None,
):
    """Compress the convolutional (and optionally linear) layers of a model by factorisation.

    Each selected layer's weight ``W`` is decomposed so as to minimise
    ``||(W - W~) Sigma^{1/2}||_F``, with ``Sigma`` the second moment of the layer's input
    patches on calibration data, which is the expected squared change of the layer's output
    (Kalle et al., NeurIPS 2025), and replaced by a stack of standard layers. With
    ``calibration='one-shot'`` every layer's statistics come from the original model and the
    layers are compressed independently.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is copied first unless ``inplace=True``.
    data : tensor, DataLoader, iterable of batches, or mapping of InputStatistics
        Calibration inputs (any form :func:`collect_input_statistics` takes) or statistics
        already collected for the target layers. May be None only with ``norm='frobenius'``.
    method : {'tucker2', 'cp4', 'cp3'}, default is 'tucker2'
        Factorisation of convolutions with a kernel larger than 1x1: Tucker-2 (1x1, kh x kw,
        1x1), CP with separate vertical and horizontal depthwise convolutions, or CP with one
        depthwise kh x kw convolution. 1x1 convolutions and Linear layers always get the
        closed-form low-rank pair.
    param_ratio : float in (0, 1], optional
        Each compressed layer keeps at most this fraction of its weights; ranks are solved per
        layer. Used for layers without an entry in ``ranks``; 0.5 when None.
    ranks : mapping, optional
        Layer name to rank: ``(out_rank, in_rank)`` for Tucker-2 (mode 0 is the output
        channels, as in TensorLy), an int for CP and low-rank layers. Layers without an entry
        use ``param_ratio``.
    layers : None, 'all' or list of str
        Layers to compress: by default every ``Conv2d`` with a kernel larger than 1x1 and
        ``groups == 1``; 'all' adds 1x1 convolutions and Linear layers; or a list of names.
    exclude : iterable of str
        Layer names to leave unchanged.
    norm : {'sigma', 'frobenius'}, default is 'sigma'
        Fit in the input statistics' metric, or in the Frobenius norm of the weights (the
        classical method, for comparison; the report still gives the metric error when data
        is given).
    calibration : {'one-shot', 'sequential'}, default is 'one-shot'
        'sequential' compresses the layers in forward order and fits each one to its inputs
        in the partially compressed model, with the original layer's output as the target
        (see :mod:`tensorly_datc.nn.sequential`). It needs calibration inputs, not statistics,
        and runs the models once per layer over them.
    inplace : bool, default is False
        Modify ``model`` itself instead of a copy.
    progress : bool, default is True
        Show progress bars over calibration batches and layers.
    input_size : tuple of int, optional
        Shape of one input sample without the batch dimension, such as (3, 32, 32), for the
        MAC counts; by default taken from the calibration data.
    require_fewer_macs : bool, default is False
        Also skip layers whose factorised form does not lower the MACs (layers that do not
        lower the parameters are always skipped).
    batch_size : int, optional
        Batch size when ``data`` is one tensor of inputs.
    decomposition_options : dict, optional
        Extra arguments for :func:`weighted_tucker2` or :func:`weighted_parafac`, such as
        ``n_iter_max`` or ``random_state``.
    budget : float in (0, 1), optional
        Global allocation: keep this fraction of the compressed layers' total weights (or
        MACs, with ``budget_unit='macs'``), with ranks spread over the layers to minimise the
        sum of squared relative metric errors (:func:`tensorly_datc.nn.allocate_ranks`)
        instead of one ratio for every layer. Exclusive with ``param_ratio`` and ``ranks``.
    budget_unit : {'parameters', 'macs'}, default is 'parameters'
        What ``budget`` counts.
    distributed : bool, optional
        Whether to spread the work over the processes of the default torch.distributed
        process group: each process passes its own shard of the calibration data, the
        statistics are summed over all shards, and process ``i % world_size`` decomposes the
        ``i``-th layer and broadcasts the result (:mod:`tensorly_datc.nn.distributed`), so
        every process returns the same model and report. Statistics passed as ``data`` are
        used as given, so they must already cover all shards. None (the default) distributes
        when a group of more than one process is initialised, True requires a group, False
        compresses on this process alone. With ``budget``, every process allocates the ranks
        itself, and the owner of a layer uses its own allocation. For outputs equal to a
        single-process run, pass an integer ``random_state`` in ``decomposition_options``
        when ``init='random'``.

    Returns
    -------
    compressed_model : torch.nn.Module
    report : CompressionReport
        Per layer: method, ranks, parameters and MACs before and after, relative metric and
        Frobenius errors; skipped layers with the reason. ``print(report)`` shows a table.

    Raises
    ------
    NotImplementedError
        If ``calibration='sequential'`` is combined with a distributed group of more than one
        process, because each layer's fit needs the previous layers' replacements.
    RuntimeError
        If ``distributed`` is True and no torch.distributed process group is initialised.
    """
    check_module(model)
    check_bool(inplace, "inplace")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    decomposition_options = check_mapping(decomposition_options, "decomposition_options")
    input_size = _check_input_size(input_size)
    _check_options(method, norm, calibration, param_ratio, ranks, budget_unit)
    _check_data(data)
    parallel = resolve_distributed(distributed)
    if budget is not None and (param_ratio is not None or ranks):
        raise ValueError("budget allocates the ranks itself; pass either budget or param_ratio/ranks")
    sequential = calibration == "sequential"
    if sequential and parallel:
        raise NotImplementedError(
            "calibration='sequential' does not run across processes; use calibration='one-shot' "
            "or pass distributed=False and the whole data set on one process"
        )
    if sequential and (data is None or isinstance(data, Mapping)):
        raise ValueError("calibration='sequential' needs calibration inputs (data), not statistics")
    if sequential and not isinstance(data, torch.Tensor) and iter(data) is data:
        raise ValueError(
            "calibration='sequential' runs over data once per layer; pass a tensor, a DataLoader "
            "or a list of batches, not a one-pass iterator"
        )
    ranks = dict(ranks or {})
    if param_ratio is None:
        param_ratio = 0.5
    targets, skipped = select_layers(model, layers, exclude)
    if not targets:
        reasons = "; ".join(f"{name}: {reason}" for name, _, reason in skipped) or "it has no Conv2d or Linear layer"
        warnings.warn(f"compress found no layer to compress ({reasons})", stacklevel=2)
    unknown = sorted(set(ranks) - {name for name, _ in targets})
    if unknown:
        raise ValueError(f"ranks names layers that are not compressed: {unknown}")

    need_statistics = not sequential or budget is not None
    statistics, sizes = _statistics_for(
        model, data if need_statistics else None, targets, "frobenius" if sequential else norm,
        progress, batch_size, [name for name, _ in targets], distributed=parallel,
    )
    example = _first_example(data, input_size, model)
    if example is not None:
        try:
            sizes = _input_sizes(model, example, [name for name, _ in targets])
        except RuntimeError as error:
            if input_size is None:
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"input_size {tuple(input_size)} does not fit the model: its forward pass on one "
                f"sample of that shape failed ({reason}). Pass the shape of one input sample "
                "without the batch dimension."
            ) from error
    if (require_fewer_macs or budget_unit == "macs") and not sizes:
        raise ValueError(
            "counting MACs needs the input size: pass input_size (one sample's shape, such as "
            "(3, 32, 32)) when data is a statistics mapping or a one-pass iterator"
        )
    if budget is not None:
        ranks = allocate_ranks(
            [(name, module, _method_for(module, method)) for name, module in targets], budget,
            statistics=statistics if norm == "sigma" else None, unit=budget_unit,
            input_sizes=sizes, options={"n_iter_max": 10},
        )
    work = model if inplace else copy.deepcopy(model)
    work_modules = dict(work.named_modules())

    report = CompressionReport(method=method, norm=norm, calibration=calibration)
    rows = {}
    for name, module, reason in skipped:
        rows[name] = LayerReport(name, _describe(module), False, reason=reason)
        logger.info("skipped %s: %s", name, reason)

    if sequential:
        reference = copy.deepcopy(model) if inplace else model
        targets = [(name, None) for name in call_order(reference, example, [n for n, _ in targets])]
        fit = sequential_fit(reference, work, data, norm, batch_size, decomposition_options)
    else:
        fit = one_shot_fit(statistics, norm, decomposition_options)

    def compress_target(name):
        return compress_layer(
            work, name, work_modules[name], method, ranks.get(name), param_ratio,
            sizes.get(name), require_fewer_macs, fit,
        )

    names = [name for name, _ in targets]
    if parallel:
        rows.update(distribute_layers(work, names, compress_target, progress=progress))
    else:
        for name in tqdm(names, desc="compressing layers", disable=not progress):
            rows[name] = compress_target(name)
    order = {name: index for index, name in enumerate(dict(model.named_modules()))}
    report.layers = sorted(rows.values(), key=lambda row: order[row.name])
    return work, report


def one_shot_fit(statistics, norm, options):
    """Return the fitting function of one-shot compression (statistics of the original model)."""

    def fit(name, module, method, rank):
        second_moment = statistics[name].second_moment if statistics else None
        size = module.weight[0].numel()
        if second_moment is not None and tuple(second_moment.shape) != (size, size):
            raise ValueError(
                f"the statistics of layer {name!r} have {second_moment.shape[0]} features; the "
                f"layer's input patches have {size}"
            )
        fit_metric = second_moment if norm == "sigma" else None
        replacement, approximation, used = factorise_layer(
            module, method, rank, fit_metric, name=name, options=options
        )
        if second_moment is not None:
            second_moment = second_moment.to(approximation.device)
        metric_error, frobenius_error = relative_errors(module.weight.detach(), approximation, second_moment)
        note = "all-zero input statistics: fitted in the Frobenius norm" if (
            norm == "sigma" and used is None) else ""
        return replacement, metric_error, frobenius_error, note

    return fit


def compress_layer(model, name, module, method, rank, param_ratio, input_size, require_fewer_macs,
                   fit):
    """Factorise layer ``name`` of ``model`` in place and return its report row.

    ``fit(name, module, method, rank)`` returns the replacement, the relative metric and
    Frobenius errors, and a note for the report.
    """
    layer_method = _method_for(module, method)
    weight_shape = tuple(module.weight.shape)
    if rank is None:
        rank = ranks_for_ratio(layer_method, weight_shape, param_ratio)
    rank = _check_rank(name, layer_method, rank, module)
    params_before = count_parameters(module)
    row = LayerReport(name, _describe(module), False, layer_method, rank, params_before, params_before)
    row.macs_before = row.macs_after = _macs(module, input_size)

    bias = 0 if module.bias is None else module.bias.numel()
    planned = factorised_parameters(layer_method, weight_shape, rank) + bias
    if planned >= params_before:
        row.reason = (f"factorised form at rank {rank} would have {planned} parameters, "
                      f"not fewer than {params_before}; left unchanged")
        logger.info("skipped %s: %s", name, row.reason)
        return row

    replacement, metric_error, frobenius_error, note = fit(name, module, layer_method, rank)
    macs_after = _macs(replacement, input_size)
    if require_fewer_macs and macs_after is not None and macs_after >= row.macs_before:
        row.reason = (f"factorised form would need {macs_after} MACs, not fewer than "
                      f"{row.macs_before}; left unchanged")
        logger.info("skipped %s: %s", name, row.reason)
        return row

    _set_submodule(model, name, replacement)
    row.compressed = True
    row.params_after = count_parameters(replacement)
    row.macs_after = macs_after
    row.metric_error, row.frobenius_error, row.reason = metric_error, frobenius_error, note
    logger.info("compressed %s with %s at rank %s: metric error %s", name, layer_method, rank,
                metric_error)
    return row
