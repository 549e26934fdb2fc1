"""Input statistics and compression spread over the processes of a torch.distributed group.

Each process collects the input statistics of its own shard of the calibration data, and
:func:`all_reduce_statistics` sums the shards' moments so that every process has the
statistics of the whole data set. :func:`distribute_layers` then lets process ``i % world_size``
decompose the ``i``-th layer and sends each replacement to the other processes, so every
process ends with the same compressed model.

Everything here uses the default process group. With the gloo backend the collectives take
CPU tensors. With nccl they take tensors on ``torch.cuda.current_device()``, so each process
must call ``torch.cuda.set_device`` with its own GPU before it collects or compresses.
"""

import logging

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .serialization import rebuild_structure
from .statistics import InputStatistics

__all__ = ["is_distributed", "resolve_distributed", "all_reduce_statistics", "distribute_layers"]

logger = logging.getLogger(__name__)


def is_distributed():
    """Return True if a torch.distributed process group of several processes is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_distributed(distributed):
    """Return whether to combine results across processes for a ``distributed`` argument.

    Parameters
    ----------
    distributed : bool or None
        None: combine when :func:`is_distributed` is True. True: combine, and raise if no
        process group is initialised. False: never combine.

    Returns
    -------
    bool
        True only when results are to be combined and the group has more than one process,
        since a group of one process has nothing to exchange.

    Raises
    ------
    ValueError
        If ``distributed`` is not None, True or False.
    RuntimeError
        If ``distributed`` is True and no process group is initialised.
    """
    if distributed is None:
        return is_distributed()
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be None, True or False; got {distributed!r}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group first, or pass distributed=None or False"
        )
    return distributed and dist.get_world_size() > 1


def _communication_device():
    """Return the device of the tensors that the default process group's collectives take."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    # gloo, mpi and a group created without a backend name (gloo for CPU tensors) take CPU
    # tensors. NOTE: a backend other than nccl that takes only accelerator tensors fails here.
    return torch.device("cpu")


def _check_statistics_match(statistics):
    """Raise unless every process has InputStatistics of the same layers and sizes.

    The processes exchange their layer lists first, so all of them raise the same error and
    none is left waiting in an all-reduce that another process never joins.
    """
    invalid = [
        f"statistics[{name!r}] must be an InputStatistics; got {type(layer).__name__}"
        for name, layer in statistics.items()
        if not isinstance(layer, InputStatistics)
    ]
    local_layers = sorted(
        (name, layer.n_features)
        for name, layer in statistics.items()
        if isinstance(layer, InputStatistics)
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local_layers, invalid))

    # Check the types, then compare every process's layers with those of process 0
    for rank, (_, rank_invalid) in enumerate(gathered):
        if rank_invalid:
            raise TypeError(f"on process {rank}, {'; '.join(rank_invalid)}")
    reference = dict(gathered[0][0])
    for rank, (layers, _) in enumerate(gathered[1:], start=1):
        layers = dict(layers)
        missing = sorted(set(reference) - set(layers))
        extra = sorted(set(layers) - set(reference))
        if missing or extra:
            raise ValueError(
                f"the input statistics must name the same layers on every process; process "
                f"{rank} lacks {missing} and has extra {extra} compared with process 0"
            )
        sizes = [
            f"{name!r} has {reference[name]} features on process 0 and {size} on process {rank}"
            for name, size in layers.items()
            if size != reference[name]
        ]
        if sizes:
            raise ValueError(
                "the input statistics must have the same sizes on every process; "
                + "; ".join(sizes)
            )


def _all_reduce_layer(layer_statistics, device):
    """Return one layer's statistics combined over all processes, on the layer's device."""
    n_features = layer_statistics.n_features
    count = float(layer_statistics.count)

    # Sums of x x^T and x, and the count, in one buffer so that one all-reduce moves them
    second_moment_sum = (layer_statistics.second_moment * count).flatten()
    mean_sum = layer_statistics.mean * count
    count_tensor = mean_sum.new_tensor([count])
    buffer = torch.cat([second_moment_sum, mean_sum, count_tensor]).to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer = buffer.to(layer_statistics.device)

    # Averages of the whole data set
    total_count = int(buffer[-1].item())
    second_moment = buffer[: n_features * n_features].reshape(n_features, n_features)
    mean = buffer[n_features * n_features : -1]
    if total_count == 0:
        return InputStatistics(torch.zeros_like(second_moment), torch.zeros_like(mean), 0)
    # With more than two processes the ring all-reduce may add the entries (i, j) and (j, i)
    # in different orders, and the metric checks need exact symmetry.
    second_moment = (second_moment + second_moment.T) / (2 * total_count)
    return InputStatistics(second_moment, mean / total_count, total_count)


def all_reduce_statistics(statistics):
    """Combine the input statistics of each process's data shard into those of all the data.

    The count-weighted sums ``count * E[x x^T]`` and ``count * E[x]`` and the counts of every
    layer are summed over the processes of the default group with
    :func:`torch.distributed.all_reduce`, in float64, and divided by the total count. Every
    process calls this function with its own statistics and receives the same result.

    Parameters
    ----------
    statistics : mapping of str to InputStatistics
        Statistics of this process's shard, such as :func:`collect_input_statistics` returns
        with ``distributed=False``. A layer whose count is 0 contributes nothing.

    Returns
    -------
    dict of str to InputStatistics
        Statistics of the union of all shards, in the order of ``statistics``, each on the
        device of the corresponding input.

    Raises
    ------
    RuntimeError
        If no process group is initialised.
    TypeError
        If a value of ``statistics`` is not an InputStatistics on any process.
    ValueError
        If the processes pass different layer names or different feature counts for a layer.
        The message names the differing process and layers.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "all_reduce_statistics needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group first"
        )
    _check_statistics_match(statistics)

    # Reduce the layers in sorted order, which is the same on every process
    device = _communication_device()
    reduced = {name: _all_reduce_layer(statistics[name], device) for name in sorted(statistics)}
    return {name: reduced[name] for name in statistics}


def _raise_if_any_failed(failure, action):
    """Raise on every process if any process reports a failure.

    ``failure`` is None, or ``(layer name, exception)`` on a process where ``action`` failed.
    That process re-raises its exception and the others raise RuntimeError naming the layer
    and the process, so no process is left waiting in a collective that the failed one never
    joins. Every process of the group must call this function.
    """
    reports = [None] * dist.get_world_size()
    local_report = None
    if failure is not None:
        name, error = failure
        local_report = (name, f"{type(error).__name__}: {error}")
    dist.all_gather_object(reports, local_report)
    if failure is not None:
        raise failure[1]
    for rank, report in enumerate(reports):
        if report is not None:
            name, message = report
            raise RuntimeError(f"layer {name!r} failed to {action} on process {rank}: {message}")


def _compress_own_layers(names, compress_one, progress):
    """Compress this process's share of ``names`` and return {name: row}."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    own_names = names[rank::world_size]
    logger.info("process %d compresses layers %s", rank, own_names)
    rows, failure = {}, None
    for name in tqdm(own_names, desc=f"compressing layers (process {rank})", disable=not progress):
        try:
            rows[name] = compress_one(name)
        except Exception as error:  # raised again on every process by _raise_if_any_failed
            failure = (name, error)
            break
    _raise_if_any_failed(failure, "compress")
    return rows


def _broadcast_layer(model, name, row, owner):
    """Broadcast layer ``name``'s report row and replacement weights from process ``owner``.

    Returns ``(row, state)`` on every process, where ``state`` is the replacement's
    ``state_dict`` on the CPU, or None for a layer left unchanged.
    """
    payload = [None]
    if dist.get_rank() == owner:
        state = None
        if row.compressed:
            # CPU copies, because a pickled CUDA tensor is loaded back on the sender's GPU index.
            layer_state = model.get_submodule(name).state_dict()
            state = {key: tensor.detach().cpu() for key, tensor in layer_state.items()}
        payload = [(row, state)]

    # NOTE: broadcast_object_list pickles the weights, which is fine for CNN layers of a few
    # MB but makes a temporary CPU copy and a pickled copy of each replacement.
    dist.broadcast_object_list(payload, src=owner)
    return payload[0]


def _load_replacement(model, name, row, state):
    """Replace layer ``name`` by an empty stack of the row's method and rank, and load ``state``."""
    rebuild_structure(model, [{"name": name, "method": row.method, "rank": row.rank}])
    model.get_submodule(name).load_state_dict(state, strict=True)


def distribute_layers(model, names, compress_one, *, progress=True):
    """Compress the layers ``names`` of ``model`` in parallel over the processes of the group.

    Process ``i % world_size`` compresses the ``i``-th layer of ``names`` by calling
    ``compress_one(name)``, which must replace the layer in ``model`` and return its
    :class:`LayerReport`. Then each owner broadcasts the report row and the replacement's
    ``state_dict``, and the other processes rebuild the same stack of layers with
    :func:`rebuild_structure` and load the weights. Every process must call this function
    with the same ``names`` in the same order.

    Parameters
    ----------
    model : torch.nn.Module
        This process's copy of the model, compressed in place.
    names : list of str
        Layers to compress, identical on every process.
    compress_one : callable
        ``compress_one(name) -> LayerReport``, as :func:`compress_layer` with fixed options.
    progress : bool, default is True
        Show a progress bar over this process's layers.

    Returns
    -------
    dict of str to LayerReport
        The report row of every layer in ``names``, the same on every process.

    Raises
    ------
    RuntimeError
        If ``compress_one`` raised on another process, or if the weights of a layer do not
        fit the stack rebuilt from its report row on another process. The process where the
        error happened re-raises the original error.
    """
    names = list(names)
    rows = _compress_own_layers(names, compress_one, progress)

    # Send each replacement from its owner to the other processes
    rank, world_size = dist.get_rank(), dist.get_world_size()
    failure = None
    for index, name in enumerate(names):
        owner = index % world_size
        rows[name], state = _broadcast_layer(model, name, rows.get(name), owner)
        if rank == owner or not rows[name].compressed or failure is not None:
            continue
        try:
            _load_replacement(model, name, rows[name], state)
        except (RuntimeError, ValueError) as error:  # a stack whose shapes differ from the owner's
            failure = (name, error)
    _raise_if_any_failed(failure, "load the owner's weights")
    return {name: rows[name] for name in names}
