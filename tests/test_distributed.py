"""Tests of statistics and compression spread over two processes with torch.distributed.

One module fixture spawns two processes on this machine (gloo backend, file:// rendezvous in a
temporary folder). Each process gets part of the calibration inputs, runs every distributed
case and writes its results to files, which the tests compare with a single-process run.
"""

import json
import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from tensorly_datc.nn import (  # noqa: E402
    InputStatistics,
    collect_input_statistics,
    compress,
    load_statistics,
    save_statistics,
)
from tensorly_datc.nn.distributed import (  # noqa: E402
    all_reduce_statistics,
    is_distributed,
    resolve_distributed,
)

WORLD_SIZE = 2

# A collective that one process never joins fails after this time instead of gloo's default
# 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

# Unequal shards, so that a reduction that ignored the counts would give wrong means.
FIRST_SHARD_SIZE = 24
N_CALIBRATION = 40
N_TEST = 8

# The shards' float64 sums are added in a different order than in one pass over all inputs,
# which changes the moments (of order 1) by a few float64 roundings.
STATISTICS_ATOL = 1e-10

# The decompositions start from the same SVD and run the same iterations on metrics that differ
# by a few roundings. The outputs, of order 1, stay well within 1e-6 of each other.
OUTPUT_ATOL = 1e-6

# Deterministic decompositions, so that one process and two processes can be compared.
OPTIONS = {"random_state": 0, "n_iter_max": 20}

# Methods compressed across processes, and whether the calibration inputs or the combined
# statistics are passed to compress.
COMPRESS_CASES = [("tucker2", "data"), ("cp4", "statistics")]


def _make_model():
    """Return a float64 CNN whose four layers are compressed with layers='all'.

    At ratio 0.5, ranks_for_ratio gives the first layer the Tucker-2 ranks (10, 1), and the
    output rank is lowered to 9 (1 input rank times 9 kernel taps) before the decomposition.
    """
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).to(torch.float64)


def _shard(inputs, rank):
    return inputs[:FIRST_SHARD_SIZE] if rank == 0 else inputs[FIRST_SHARD_SIZE:]


def _compress(model, data, method):
    return compress(
        model, data, method=method, layers="all", decomposition_options=OPTIONS, progress=False
    )


def _run_cases(rank, folder, model, inputs, test_inputs):
    """Run every distributed case on this process and write the results under ``folder``."""
    shard = _shard(inputs, rank)

    # Statistics: combined by default, per shard with distributed=False, and with an empty
    # shard on process 1
    combined = collect_input_statistics(model, shard, progress=False)
    save_statistics(combined, folder / f"combined_{rank}.safetensors")
    local = collect_input_statistics(model, shard, progress=False, distributed=False)
    save_statistics(local, folder / f"local_{rank}.safetensors")
    empty_shard = shard if rank == 0 else []
    partial = collect_input_statistics(model, empty_shard, progress=False)
    save_statistics(partial, folder / f"empty_shard_{rank}.safetensors")

    # Compression, each layer decomposed by one process
    for method, source in COMPRESS_CASES:
        compressed, report = _compress(model, shard if source == "data" else combined, method)
        with torch.no_grad():
            outputs = compressed(test_inputs)
        torch.save(outputs, folder / f"{method}_outputs_{rank}.pt")
        rows = [asdict(row) for row in report.layers]
        (folder / f"{method}_report_{rank}.json").write_text(json.dumps(rows))

    # Errors: each message is recorded with its exception type
    errors = {}
    one_layer = {f"layer_of_process_{rank}": combined["0"]}
    sized_by_process = {"layer": combined["0" if rank == 0 else "2"]}
    not_statistics = {"layer": combined["0"] if rank == 0 else combined["0"].second_moment}
    cases = {
        "different_names": lambda: all_reduce_statistics(one_layer),
        "different_sizes": lambda: all_reduce_statistics(sized_by_process),
        "not_statistics": lambda: all_reduce_statistics(not_statistics),
        "sequential": lambda: compress(model, shard, calibration="sequential", progress=False),
        # Layer "2" is the second target, so process 1 decomposes it and rejects the rank.
        "layer_failure": lambda: _compress_with_ranks(model, shard, {"2": (0, 4)}),
    }
    for case, call in cases.items():
        try:
            call()
        except Exception as error:  # the parent checks the type and message
            errors[case] = [type(error).__name__, str(error)]
    (folder / f"errors_{rank}.json").write_text(json.dumps(errors))


def _compress_with_ranks(model, data, ranks):
    return compress(model, data, ranks=ranks, layers="all", progress=False)


def _worker(rank, world_size, folder):
    """Join the process group, run the cases and leave the group."""
    folder = Path(folder)
    torch.set_num_threads(1)
    if Path("/sys/class/net/lo").exists():
        # Keep gloo's connections on the Linux loopback interface, whatever the host name
        # resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        state = torch.load(folder / "setup.pt")
        model = _make_model()
        model.load_state_dict(state["model"])
        _run_cases(rank, folder, model, state["inputs"], state["test_inputs"])
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run torch on one thread in this process, as in the workers, and restore the count.

    The layers are small, and a second thread mostly waits on the busy cores of a shared
    machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup():
    """Return the model, the calibration inputs and the test inputs, all float64."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _make_model().eval()
    inputs = torch.randn(N_CALIBRATION, 3, 8, 8, generator=generator, dtype=torch.float64)
    test_inputs = torch.randn(N_TEST, 3, 8, 8, generator=generator, dtype=torch.float64)
    return model, inputs, test_inputs


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory):
    """Run the cases on two spawned processes and return the folder of their results."""
    folder = tmp_path_factory.mktemp("distributed")
    model, inputs, test_inputs = setup
    state = {"model": model.state_dict(), "inputs": inputs, "test_inputs": test_inputs}
    torch.save(state, folder / "setup.pt")
    mp.spawn(_worker, args=(WORLD_SIZE, str(folder)), nprocs=WORLD_SIZE, join=True)
    return folder


@pytest.fixture(scope="module")
def one_process(setup):
    """Return the single-process statistics and, per method, compressed outputs and report."""
    model, inputs, test_inputs = setup
    statistics = collect_input_statistics(model, inputs, progress=False)
    reference = {"statistics": statistics}
    for method, source in COMPRESS_CASES:
        compressed, report = _compress(model, inputs if source == "data" else statistics, method)
        with torch.no_grad():
            outputs = compressed(test_inputs)
        rows = json.loads(json.dumps([asdict(row) for row in report.layers]))
        reference[method] = (outputs, rows)
    return reference


def _assert_statistics_close(actual, expected, atol):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].count == expected[name].count, name
        torch.testing.assert_close(
            actual[name].second_moment, expected[name].second_moment, rtol=0, atol=atol
        )
        torch.testing.assert_close(actual[name].mean, expected[name].mean, rtol=0, atol=atol)


def _errors(results, rank):
    return json.loads((results / f"errors_{rank}.json").read_text())


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_combined_statistics_match_one_process(one_process, results, rank):
    combined = load_statistics(results / f"combined_{rank}.safetensors")
    _assert_statistics_close(combined, one_process["statistics"], STATISTICS_ATOL)


def test_combined_statistics_identical_on_processes(results):
    first = load_statistics(results / "combined_0.safetensors")
    second = load_statistics(results / "combined_1.safetensors")
    _assert_statistics_close(second, first, atol=0)


def test_combined_second_moments_exactly_symmetric(results):
    for layer in load_statistics(results / "combined_1.safetensors").values():
        assert torch.equal(layer.second_moment, layer.second_moment.T)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_distributed_false_keeps_shard_statistics(setup, results, rank):
    model, inputs, _ = setup
    expected = collect_input_statistics(model, _shard(inputs, rank), progress=False)
    local = load_statistics(results / f"local_{rank}.safetensors")
    # The worker runs on one thread, so its float64 products may round differently.
    _assert_statistics_close(local, expected, STATISTICS_ATOL)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_empty_shard_adds_nothing(setup, results, rank):
    model, inputs, _ = setup
    expected = collect_input_statistics(model, _shard(inputs, 0), progress=False)
    partial = load_statistics(results / f"empty_shard_{rank}.safetensors")
    _assert_statistics_close(partial, expected, STATISTICS_ATOL)


@pytest.mark.parametrize("method, source", COMPRESS_CASES)
@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_compressed_outputs_match_one_process(one_process, results, method, source, rank):
    expected, _ = one_process[method]
    outputs = torch.load(results / f"{method}_outputs_{rank}.pt")
    torch.testing.assert_close(outputs, expected, rtol=0, atol=OUTPUT_ATOL)


@pytest.mark.parametrize("method, source", COMPRESS_CASES)
def test_compressed_outputs_identical_on_processes(results, method, source):
    first = torch.load(results / f"{method}_outputs_0.pt")
    second = torch.load(results / f"{method}_outputs_1.pt")
    assert torch.equal(first, second)


@pytest.mark.parametrize("method, source", COMPRESS_CASES)
@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_compressed_report_matches_one_process(one_process, results, method, source, rank):
    _, expected = one_process[method]
    rows = json.loads((results / f"{method}_report_{rank}.json").read_text())
    assert [row["name"] for row in rows] == [row["name"] for row in expected]
    assert sum(row["compressed"] for row in rows) >= 2, "too few layers compressed to test"
    for row, expected_row in zip(rows, expected):
        for key in ("compressed", "method", "rank", "params_after", "macs_after", "reason"):
            assert row[key] == expected_row[key], (row["name"], key)
        for key in ("metric_error", "frobenius_error"):
            assert row[key] == pytest.approx(expected_row[key], abs=OUTPUT_ATOL), (row["name"], key)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_different_layer_names_raise(results, rank):
    error_type, message = _errors(results, rank)["different_names"]
    assert error_type == "ValueError"
    assert "lacks ['layer_of_process_0']" in message
    assert "extra ['layer_of_process_1']" in message


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_different_layer_sizes_raise(results, rank):
    error_type, message = _errors(results, rank)["different_sizes"]
    assert error_type == "ValueError"
    # Layer "0" has 3 * 3 * 3 input features and layer "2" has 32 * 3 * 3.
    assert "'layer' has 27 features on process 0 and 288 on process 1" in message


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_statistics_type_on_one_process_raises(results, rank):
    error_type, message = _errors(results, rank)["not_statistics"]
    assert error_type == "TypeError"
    assert "on process 1, statistics['layer'] must be an InputStatistics; got Tensor" in message


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_sequential_calibration_raises_in_group(results, rank):
    error_type, message = _errors(results, rank)["sequential"]
    assert error_type == "NotImplementedError"
    assert "distributed=False" in message


def test_layer_failure_raises_on_owner(results):
    error_type, message = _errors(results, 1)["layer_failure"]
    assert error_type == "ValueError"
    assert "ranks['2']" in message


def test_layer_failure_raises_on_other_process(results):
    error_type, message = _errors(results, 0)["layer_failure"]
    assert error_type == "RuntimeError"
    assert "layer '2' failed to compress on process 1" in message
    assert "ranks['2']" in message


def test_distributed_true_without_group_raises(setup):
    model, inputs, _ = setup
    assert not is_distributed()
    with pytest.raises(RuntimeError, match="init_process_group"):
        collect_input_statistics(model, inputs, progress=False, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        compress(model, inputs, progress=False, distributed=True)


def test_all_reduce_without_group_raises(setup):
    model, inputs, _ = setup
    statistics = collect_input_statistics(model, inputs, progress=False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_statistics(statistics)


def test_distributed_none_without_group_runs_locally(setup):
    model, inputs, _ = setup
    expected = collect_input_statistics(model, inputs, progress=False, distributed=False)
    statistics = collect_input_statistics(model, inputs, progress=False)
    _assert_statistics_close(statistics, expected, atol=0)


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_invalid_distributed_value_raises(value):
    with pytest.raises(ValueError, match="distributed must be None, True or False"):
        resolve_distributed(value)


def test_group_of_one_process_combines_nothing(tmp_path, setup):
    model, inputs, _ = setup
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        assert not is_distributed()
        assert resolve_distributed(True) is False
        statistics = collect_input_statistics(model, inputs, progress=False, distributed=True)
        reduced = all_reduce_statistics(statistics)
    finally:
        dist.destroy_process_group()
    expected = collect_input_statistics(model, inputs, progress=False)
    _assert_statistics_close(statistics, expected, atol=0)
    _assert_statistics_close(reduced, expected, STATISTICS_ATOL)
    assert all(isinstance(layer, InputStatistics) for layer in reduced.values())
