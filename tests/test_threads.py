"""Tests of the decompositions called from several threads at once."""

import threading

import numpy as np
import pytest
import tensorly as tl
from threadpoolctl import threadpool_info

from tensorly_datc import weighted_parafac, weighted_tucker2
from tensorly_datc._solvers import _single_threaded_lapack


def _blas_threads():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def _problem(seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((12, 8, 3, 3))
    patches = rng.standard_normal((400, 8 * 3 * 3))
    return weight, patches.T @ patches / len(patches)


def _run_in_threads(function, n_threads):
    """Run ``function(index)`` in ``n_threads`` threads and return their results and errors."""
    results, errors = [None] * n_threads, []

    def run(index):
        try:
            results[index] = function(index)
        except Exception as error:  # the tests assert that no call raised
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_single_threaded_lapack_limits_main_thread_only():
    before = _blas_threads()

    with _single_threaded_lapack():
        inside_main = _blas_threads()
    seen_in_worker = []

    def worker():
        with _single_threaded_lapack():
            seen_in_worker.append(_blas_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()

    assert inside_main == [1] * len(before)
    assert seen_in_worker == [before]
    assert _blas_threads() == before


def test_concurrent_numpy_calls_match_serial_ones():
    before = _blas_threads()
    problems = [_problem(seed) for seed in range(3)]
    serial = [weighted_tucker2(weight, (4, 3), metric, n_iter_max=20, random_state=0)[1][-1]
              for weight, metric in problems]

    def decompose(index):
        weight, metric = problems[index]
        weighted_parafac(weight, 5, metric, n_iter_max=5, random_state=0)
        return weighted_tucker2(weight, (4, 3), metric, n_iter_max=20, random_state=0)[1][-1]

    results, errors = _run_in_threads(decompose, 3)

    assert errors == []
    # The same arithmetic runs, whichever thread runs it.
    assert results == pytest.approx(serial, rel=1e-12)
    assert _blas_threads() == before


def test_concurrent_torch_calls_keep_their_backend():
    # Each call switches TensorLy to the backend of its tensor. The switch must stay in its
    # thread, or another thread's numpy call would meet torch operations. With a process-wide
    # switch, this test failed in about one run of three.
    torch = pytest.importorskip("torch")
    problems = [_problem(seed) for seed in range(8)]

    def decompose(index):
        weight, metric = problems[index]
        if index % 2:
            weight, metric = torch.from_numpy(weight), torch.from_numpy(metric)
        return float(weighted_tucker2(weight, (4, 3), metric, n_iter_max=20, random_state=0)[1][-1])

    backend = tl.get_backend()
    results, errors = _run_in_threads(decompose, 8)

    assert errors == []
    assert all(np.isfinite(results))
    assert tl.get_backend() == backend
