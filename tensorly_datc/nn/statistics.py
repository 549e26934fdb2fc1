"""Second moments of the inputs of convolutional and linear layers.

The metric of a layer's decomposition is ``Sigma = E[x x^T]``, the uncentred second
moment of the vectors that the layer multiplies by its weight matrix. For a ``Conv2d``
these are the im2col patches, in the order of :func:`torch.nn.functional.unfold`
(channel slowest, then kernel row, then kernel column). For a ``Linear`` they are the
input rows. This module collects the moments with forward pre-hooks in one pass over
calibration data, merges them and stores them in safetensors files.
"""

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
import logging
import operator
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

__all__ = ["InputStatistics", "collect_input_statistics", "save_statistics", "load_statistics"]

from .. import _backend as backend
from ._checks import check_bool, check_module, check_names, check_positive_int
from ._conv_moments import _accumulate_conv2d, _chunk_scale

logger = logging.getLogger(__name__)

# Stored in each file's metadata, so that load_statistics rejects other safetensors files.
_FILE_FORMAT = "tensorly_datc.input_statistics.v1"


class InputStatistics:
    """First and second moments of a layer's input vectors.

    Parameters
    ----------
    second_moment : torch.Tensor of shape (D, D)
        Uncentred second moment ``E[x x^T]`` of the input vectors ``x``.
    mean : torch.Tensor of shape (D,)
        Mean ``E[x]`` of the input vectors.
    count : int
        Number of input vectors (patches or rows) the moments average over.

    Both moments are stored as float64 tensors, without a copy when they already are.
    ``a + b`` merges the statistics of two disjoint sets of inputs, weighting each by its
    count, so collecting in parts and merging gives the moments of the whole set.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    >>> stats = InputStatistics(x.T @ x / 2, x.mean(0), count=2)
    >>> stats
    InputStatistics(n_features=2, count=2, device='cpu')
    >>> stats.covariance
    tensor([[1., 1.],
            [1., 1.]], dtype=torch.float64)
    """

    def __init__(self, second_moment, mean, count):
        second_moment = torch.as_tensor(second_moment, dtype=torch.float64)
        mean = torch.as_tensor(mean, dtype=torch.float64, device=second_moment.device)
        if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
            raise ValueError(
                f"second_moment must be a square matrix; got shape {tuple(second_moment.shape)}"
            )
        if mean.shape != second_moment.shape[:1]:
            raise ValueError(
                f"mean must have shape ({second_moment.shape[0]},) to match second_moment; "
                f"got shape {tuple(mean.shape)}"
            )
        count = operator.index(count)
        if count < 0:
            raise ValueError(f"count must be non-negative; got {count}")
        self.second_moment = second_moment
        self.mean = mean
        self.count = count

    @property
    def n_features(self):
        """Dimension D of the input vectors."""
        return self.mean.shape[0]

    @property
    def device(self):
        """Device of the stored moments."""
        return self.second_moment.device

    @property
    def covariance(self):
        """Centred second moment ``E[x x^T] - E[x] E[x]^T``, of shape (D, D).

        A fit in this metric minimises the expected output error only if the mean shift
        ``(W - W~) E[x]`` is then added to the bias of the compressed layer.
        """
        return self.second_moment - torch.outer(self.mean, self.mean)

    def to(self, device):
        """Return the statistics on ``device``, as a copy unless they are already there."""
        device = torch.device(device)
        if device == self.device:
            return self
        return InputStatistics(self.second_moment.to(device), self.mean.to(device), self.count)

    def __add__(self, other):
        if not isinstance(other, InputStatistics):
            return NotImplemented
        if other.n_features != self.n_features:
            raise ValueError(
                "cannot merge input statistics of different sizes: "
                f"{self.n_features} and {other.n_features} features"
            )
        if other.device != self.device:
            raise ValueError(
                f"cannot merge input statistics on different devices: {self.device} and "
                f"{other.device}; move one with .to(device) first"
            )
        count = self.count + other.count
        if count == 0:
            empty_second_moment = torch.zeros_like(self.second_moment)
            return InputStatistics(empty_second_moment, torch.zeros_like(self.mean), 0)

        # Count-weighted average of the two sets' moments
        weight_self, weight_other = self.count / count, other.count / count
        second_moment = self.second_moment * weight_self + other.second_moment * weight_other
        mean = self.mean * weight_self + other.mean * weight_other
        return InputStatistics(second_moment, mean, count)

    def __radd__(self, other):
        # Lets sum() start from its default 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def __repr__(self):
        return (
            f"InputStatistics(n_features={self.n_features}, count={self.count}, "
            f"device='{self.device}')"
        )


class _MomentAccumulator:
    """Running float64 sums of ``x``, ``x x^T`` and the number of vectors ``x``.

    Each chunk's product ``rows^T rows`` is computed in float64 for float64 inputs and in
    float32 otherwise (twice as fast on CPUs and far faster on GPUs), then added to float64
    sums. A chunk holds at most a few thousand rows, so its float32 product is accurate to
    about 1e-6 relative, while the float64 sums keep that accuracy over millions of rows.
    """

    def __init__(self):
        self.sum_outer = None
        self.sum = None
        self.count = 0
        # Blocks of tap pairs held back from sum_outer by the shifted products
        # (see _shifted_products._TapBlocks)
        self.tap_blocks = None

    def update(self, rows):
        """Add the rows of ``rows`` (P, D) to the sums."""
        product_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        rows = rows.to(product_dtype)
        if self.sum_outer is None:
            n_features = rows.shape[1]
            self.sum_outer = rows.new_zeros((n_features, n_features), dtype=torch.float64)
            self.sum = rows.new_zeros(n_features, dtype=torch.float64)
        product = (rows.T @ rows).to(torch.float64)
        # A float32 product is symmetric only up to rounding; the metric checks need exact symmetry.
        self.sum_outer += (product + product.T) / 2
        self.sum += rows.to(torch.float64).sum(dim=0)
        self.count += rows.shape[0]

    def to_statistics(self):
        """Return the moments, dividing the sums in place: the accumulator is spent afterwards."""
        if self.tap_blocks is not None:
            self.tap_blocks.flush(self)
        if self.sum_outer is None:
            # Every patch the shifted products saw read only zero padding.
            self.sum_outer = self.sum.new_zeros((self.sum.shape[0], self.sum.shape[0]))
        # A new array of the size of the sums costs more than the division (page faults).
        self.sum_outer /= self.count
        self.sum /= self.count
        return InputStatistics(self.sum_outer, self.sum, self.count)


def _accumulate_linear(accumulator, module, inputs, max_patches_per_chunk):
    """Add the input rows of ``module`` (a Linear) on ``inputs`` (*, in_features)."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    for start in range(0, rows.shape[0], max_patches_per_chunk):
        accumulator.update(rows[start : start + max_patches_per_chunk])


# Accumulation function of each layer type. A faster replacement (for example one that
# multiplies shifted feature maps instead of unfolded patches) must add the same float64 sums.
_ACCUMULATORS = {torch.nn.Conv2d: _accumulate_conv2d, torch.nn.Linear: _accumulate_linear}


def _accumulation_function(module):
    """Return the accumulation function for ``module``'s type, or None if it has none."""
    for layer_type, function in _ACCUMULATORS.items():
        if isinstance(module, layer_type):
            return function
    return None


def _select_layers(model, layers):
    """Return {name: module} of the layers to collect, skipping grouped convolutions."""
    modules = dict(model.named_modules())
    if layers is None:
        candidates = {
            name: module
            for name, module in modules.items()
            if _accumulation_function(module) is not None
        }
    else:
        names = [layers] if isinstance(layers, str) else check_names(layers, "layers")
        unknown = [name for name in names if name not in modules]
        if unknown:
            collectable = [name for name, module in modules.items() if _accumulation_function(module)]
            listed = ", ".join(repr(name) for name in collectable[:10])
            more = f" and {len(collectable) - 10} more" if len(collectable) > 10 else ""
            raise ValueError(
                f"layers not found in the model: {unknown}; its Conv2d and Linear layers are "
                f"{listed}{more}"
            )
        unsupported = [
            f"{name} ({type(modules[name]).__name__})"
            for name in names
            if _accumulation_function(modules[name]) is None
        ]
        if unsupported:
            raise ValueError(
                f"layers must be nn.Conv2d or nn.Linear modules; got {', '.join(unsupported)}"
            )
        candidates = {name: modules[name] for name in names}

    # A grouped convolution has one weight matrix, and so one metric, per group.
    # NOTE: per-group statistics are not collected, so these layers are skipped.
    # The skip is logged as a warning for a layer the caller named, as information otherwise.
    level = logging.INFO if layers is None else logging.WARNING
    selected = {}
    for name, module in candidates.items():
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            logger.log(level, "Skipping layer %s: grouped convolution (groups=%d)", name, module.groups)
        else:
            selected[name] = module
    return selected


def _iterate_inputs(data, batch_size):
    """Yield the input tensor of each batch of ``data``."""
    if isinstance(data, torch.Tensor):
        yield from torch.split(data, batch_size)
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                "each batch must be a tensor or a tuple/list whose first element is the "
                f"input tensor; got {type(batch).__name__}"
            )
        yield batch


def _batch_count(data, batch_size):
    """Return the number of batches for the progress bar, or None if unknown."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    try:
        return len(data)
    except TypeError:
        return None


class _BufferedHook:
    """Forward pre-hook that adds a layer's inputs to ``accumulator``, a chunk at a time.

    Inputs of consecutive batches are held back until their input positions (pixels for a
    convolution, rows for a linear layer) fill a chunk of ``chunk_positions``, and then added
    together. Layers with small inputs, such as the last stages of a CNN, would otherwise pay
    the float64 update of the ``D x D`` sums once per batch, which can cost more than their
    products. Call :meth:`flush` after the last batch.
    """

    def __init__(self, name, accumulator, accumulate, max_patches_per_chunk, chunk_positions):
        self.name = name
        self.accumulator = accumulator
        self.accumulate = accumulate
        self.max_patches_per_chunk = max_patches_per_chunk
        self.chunk_positions = chunk_positions
        self.module = None
        self.pending = []
        self.pending_positions = 0

    def __call__(self, module, args, kwargs):
        inputs = args[0] if args else kwargs["input"]
        if not backend.is_finite(inputs):
            raise ValueError(f"the input of layer {self.name} contains non-finite values (NaN or inf)")
        inputs = inputs.detach()
        if isinstance(module, torch.nn.Conv2d) and inputs.ndim == 3:
            inputs = inputs.unsqueeze(0)
        # Batches are joined along their first dimension, so the other dimensions must agree.
        if self.pending and self.pending[0].shape[1:] != inputs.shape[1:]:
            self.flush()
        self.module = module
        self.pending_positions += inputs.numel() // _position_size(module, inputs)
        if self.pending_positions >= self.chunk_positions:
            self.pending.append(inputs)
            self.flush()
        else:
            # A copy, since the model may change the tensor in place after this layer has run
            self.pending.append(inputs.clone())

    def flush(self):
        """Add the held-back inputs to the accumulator."""
        if not self.pending:
            return
        inputs = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending, self.pending_positions = [], 0
        self.accumulate(self.accumulator, self.module, inputs, self.max_patches_per_chunk)


def _position_size(module, inputs):
    """Return the number of input entries per position: channels of a pixel or features of a row."""
    return inputs.shape[1] if isinstance(module, torch.nn.Conv2d) else inputs.shape[-1]


def _chunk_positions(module, max_patches_per_chunk):
    """Return how many input positions of ``module`` make one chunk of its accumulation."""
    return max_patches_per_chunk * _chunk_scale(module)


def collect_input_statistics(
    model,
    data,
    layers=None,
    *,
    batch_size=None,
    device=None,
    progress=True,
    max_patches_per_chunk=4096,
    distributed=None,
):
    """Collect the second moment of the inputs of a model's layers over calibration data.

    Forward pre-hooks record the input of each selected layer while ``model`` runs on
    ``data`` in eval mode under :func:`torch.no_grad`. For a ``Conv2d`` the input vectors
    are the im2col patches of the layer's own kernel size, stride, padding (including
    ``'same'`` and ``'valid'``), padding mode and dilation. For a ``Linear`` they are the
    input rows, with all leading dimensions flattened. Each chunk's products are formed in
    the dtype of the inputs (float32 for a float32 model, accurate to about 1e-6 of the
    largest diagonal entry) and summed in float64.

    Parameters
    ----------
    model : torch.nn.Module
        Model to run. Its weights are not changed, and the train/eval mode of every
        submodule is restored on return, also after an error.
    data : torch.Tensor, torch.utils.data.DataLoader or iterable
        Calibration inputs: one tensor of inputs, split along its first dimension into
        batches of ``batch_size``, or an iterable of batches. A batch is an input tensor or
        a tuple/list whose first element is the input tensor (as a DataLoader over
        ``(inputs, targets)`` pairs yields).
    layers : iterable of str, optional
        Names (as in ``model.named_modules()``) of the ``nn.Conv2d`` and ``nn.Linear``
        layers to collect. By default every such layer.
    batch_size : int, optional
        Number of inputs per forward pass when ``data`` is a tensor; 64 by default. Must
        be None for any other ``data``, which sets its own batches.
    device : torch.device or str, optional
        Device the batches are moved to. By default the device of the model's first
        parameter or buffer. The model itself is not moved.
    progress : bool, default is True
        Whether to show a tqdm progress bar over the batches.
    max_patches_per_chunk : int, default is 4096
        Number of patches (or rows) whose products are formed at once. It bounds the
        working memory of a layer to a few times ``8 * max_patches_per_chunk * D`` bytes
        (151 MB for a 512-channel 3x3 convolution), beside the layer's float64 sums of
        ``8 * D**2`` bytes. A single output row of one image is never split. Zero-padded
        convolutions with stride 1 take ``kernel_height`` times as many patches per chunk,
        since they copy pixels rather than patches, or whole images when Fourier transforms
        form their products (spectra of at most ``8 * max_patches_per_chunk * D`` bytes, and
        up to 16 MB per block of frequencies). Zero-padded convolutions may also hold float64
        sums of up to 32 MiB per layer for the blocks of consecutive chunks.
    distributed : bool, optional
        Whether to combine the statistics of all processes of the default torch.distributed
        process group with :func:`tensorly_datc.nn.distributed.all_reduce_statistics`. Each
        process passes its own shard of the data as ``data``, for example through a
        :class:`~torch.utils.data.DistributedSampler`, and returns the statistics of the
        union of all shards. None (the default) combines them when a group of more than one
        process is initialised, True requires a group, False returns this process's shard
        alone. When combining, every process of the group must call this function with the
        same model and ``layers``.

    Returns
    -------
    dict of str to InputStatistics
        Statistics of each collected layer, in the order of ``model.named_modules()``, on
        the device where the layer received its inputs. Both the second moment and the
        mean are stored, so the centred metric is available as
        :attr:`InputStatistics.covariance`.

    Raises
    ------
    ValueError
        If a name in ``layers`` is not a module of ``model`` or not a Conv2d or Linear
        layer, if a layer's input contains NaN or inf or its moments overflow (the message
        names the layer), or if ``batch_size`` is given for non-tensor ``data``.
    TypeError
        If ``data`` is not a tensor or an iterable of batches, or ``progress`` is not a bool.
    RuntimeError
        If ``distributed`` is True and no torch.distributed process group is initialised.

    Notes
    -----
    Grouped convolutions (``groups > 1``) are not collected. The logger
    ``tensorly_datc.nn.statistics`` names each one, at level WARNING when it was named in
    ``layers`` and INFO otherwise. Layers that never run during the pass (on any process, when
    the statistics are combined) are left out of the result, with a WARNING from the same
    logger (a log record, not a Python warning).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, kernel_size=3, padding=1),
    ...     torch.nn.Flatten(),
    ...     torch.nn.Linear(8 * 4 * 4, 10),
    ... )
    >>> statistics = collect_input_statistics(model, torch.randn(16, 3, 4, 4), progress=False)
    >>> statistics["0"]
    InputStatistics(n_features=27, count=256, device='cpu')
    >>> statistics["2"].second_moment.shape
    torch.Size([128, 128])
    """
    # Imported here because the distributed module builds on InputStatistics.
    from .distributed import all_reduce_statistics, resolve_distributed

    # Check arguments
    combine = resolve_distributed(distributed)
    check_module(model)
    if not isinstance(data, (torch.Tensor, Iterable)):
        raise TypeError(
            "data must be a tensor of inputs, a DataLoader or an iterable of batches; "
            f"got {type(data).__name__}"
        )
    check_bool(progress, "progress")
    max_patches_per_chunk = check_positive_int(max_patches_per_chunk, "max_patches_per_chunk")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    batch_size = _resolve_batch_size(data, batch_size)
    selected = _select_layers(model, layers)
    if device is None:
        device = _model_device(model)

    # Run the model with one accumulating hook per layer
    accumulators = {name: _MomentAccumulator() for name in selected}
    hooks = {
        module: _BufferedHook(
            name, accumulators[name], _accumulation_function(module), max_patches_per_chunk,
            _chunk_positions(module, max_patches_per_chunk),
        )
        for name, module in selected.items()
    }
    progress_bar = tqdm(
        _iterate_inputs(data, batch_size),
        total=_batch_count(data, batch_size),
        desc="Collecting input statistics",
        disable=not progress,
    )
    with progress_bar:
        _run_with_hooks(model, hooks, progress_bar, device)
    for hook in hooks.values():
        hook.flush()

    # Combine the shards of all processes, then leave out the layers that never ran
    statistics = {
        name: _layer_statistics(accumulators[name], module) for name, module in selected.items()
    }
    for name, layer in statistics.items():
        _check_finite_moments(name, layer)
    if combine:
        statistics = all_reduce_statistics(statistics)
    never_run = [name for name, layer in statistics.items() if layer.count == 0]
    if never_run:
        logger.warning("Layers %s received no input, so they are left out of the result", never_run)
    return {name: layer for name, layer in statistics.items() if layer.count > 0}


def _check_finite_moments(name, statistics):
    """Raise a ValueError if the moments of layer ``name`` overflowed."""
    # No entry of a second moment exceeds the largest diagonal entry, so an overflow anywhere
    # leaves an infinite or NaN entry on the diagonal.
    if backend.is_finite(statistics.second_moment.diagonal()) and backend.is_finite(statistics.mean):
        return
    raise ValueError(
        f"the input moments of layer {name!r} overflowed: its inputs are too large for float32 "
        "products. Run the model on float64 inputs (model.double()) or scale the inputs down."
    )


def _layer_statistics(accumulator, module):
    """Return the accumulated statistics, or zeros with count 0 if ``module`` never ran."""
    if accumulator.count > 0:
        return accumulator.to_statistics()
    # An input vector has one entry per weight of an output channel: in_channels * kh * kw
    # for a Conv2d, in_features for a Linear.
    n_features = module.weight[0].numel()
    second_moment = module.weight.new_zeros((n_features, n_features), dtype=torch.float64)
    return InputStatistics(second_moment, second_moment.new_zeros(n_features), 0)


def _resolve_batch_size(data, batch_size):
    """Return the batch size for tensor ``data`` (64 by default), or None for other data."""
    if isinstance(data, torch.Tensor):
        batch_size = 64 if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
        return batch_size
    if batch_size is not None:
        raise ValueError(
            f"batch_size applies only when data is a tensor; got data of type "
            f"{type(data).__name__}, which sets its own batches"
        )
    return None


def _model_device(model):
    """Return the device of the model's first parameter or buffer, or None if it has none."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _run_with_hooks(model, hooks, batches, device):
    """Run ``model`` on ``batches`` in eval mode, without gradients, with forward pre-hooks.

    ``hooks`` maps modules to their hook. The hooks are removed and the train/eval mode of
    every submodule is restored afterwards, also when the forward raises.
    """
    handles = []
    training_modes = {module: module.training for module in model.modules()}
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for inputs in batches:
                model(inputs if device is None else inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training


def _checksum(layers_json, tensors):
    """Return the SHA-256 hex digest of the layer list and the tensors' bytes, in order."""
    digest = hashlib.sha256(layers_json.encode("utf-8"))
    for key, tensor in tensors.items():
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}".encode("utf-8"))
        digest.update(tensor.numpy())
    return digest.hexdigest()


def _tensor_keys(name):
    return f"{name}.second_moment", f"{name}.mean"


def save_statistics(statistics, path):
    """Save a mapping of layer names to InputStatistics to a safetensors file.

    The tensors are stored under ``"<layer name>.second_moment"`` and
    ``"<layer name>.mean"``. The metadata stores the layer names and counts, and a
    SHA-256 checksum that :func:`load_statistics` verifies. The file is written to a
    temporary name first and then renamed, so an interrupted save leaves no partial file
    at ``path``.

    Parameters
    ----------
    statistics : mapping of str to InputStatistics
        Statistics to save, as returned by :func:`collect_input_statistics`.
    path : str or os.PathLike
        File to write; an existing file is replaced.
    """
    if not isinstance(statistics, Mapping):
        raise TypeError(
            f"statistics must be a mapping of layer names to InputStatistics; got {type(statistics).__name__}"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save statistics to {path}: folder {path.parent} does not exist")
    counts = {}
    tensors = {}
    for name, layer_statistics in statistics.items():
        if not isinstance(layer_statistics, InputStatistics):
            raise TypeError(
                f"statistics[{name!r}] must be an InputStatistics; "
                f"got {type(layer_statistics).__name__}"
            )
        second_moment_key, mean_key = _tensor_keys(name)
        tensors[second_moment_key] = layer_statistics.second_moment.detach().cpu().contiguous()
        tensors[mean_key] = layer_statistics.mean.detach().cpu().contiguous()
        counts[name] = layer_statistics.count

    layers_json = json.dumps(counts)
    metadata = {
        "format": _FILE_FORMAT,
        "layers": layers_json,
        "sha256": _checksum(layers_json, tensors),
    }
    temporary_path = path.with_name(path.name + ".partial")
    save_file(tensors, temporary_path, metadata=metadata)
    os.replace(temporary_path, path)


def load_statistics(path):
    """Load a mapping of layer names to InputStatistics saved by :func:`save_statistics`.

    Loading executes no code from the file. The statistics are loaded on the CPU.

    Parameters
    ----------
    path : str or os.PathLike
        File written by :func:`save_statistics`.

    Returns
    -------
    dict of str to InputStatistics
        The saved statistics, in the order they were saved.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a valid safetensors file, was not written by
        :func:`save_statistics`, or fails its checksum (truncated or modified).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input statistics file not found: {path}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"invalid input statistics file {path}: {error}") from error
    if metadata.get("format") != _FILE_FORMAT:
        raise ValueError(
            f"invalid input statistics file {path}: metadata format is "
            f"{metadata.get('format')!r}, expected {_FILE_FORMAT!r}"
        )

    # Verify the checksum before trusting the layer list
    layers_json = metadata.get("layers", "")
    try:
        counts = json.loads(layers_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid input statistics file {path}: unreadable layer list") from error
    keys = [key for name in counts for key in _tensor_keys(name)]
    if sorted(keys) != sorted(tensors):
        raise ValueError(
            f"invalid input statistics file {path}: tensors do not match the layer list"
        )
    ordered = {key: tensors[key] for key in keys}
    if _checksum(layers_json, ordered) != metadata.get("sha256"):
        raise ValueError(
            f"invalid input statistics file {path}: checksum mismatch, the file was modified "
            "or corrupted"
        )

    statistics = {}
    for name, count in counts.items():
        second_moment_key, mean_key = _tensor_keys(name)
        try:
            statistics[name] = InputStatistics(ordered[second_moment_key], ordered[mean_key], count)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"invalid input statistics file {path}, layer {name}: {error}"
            ) from error
    return statistics
