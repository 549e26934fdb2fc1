"""Tests of the metric-weighted CP decomposition, ``weighted_parafac`` and ``WeightedCP``.

Every error below is recomputed here from ``tl.cp_to_tensor`` and a dense copy of the metric,
never read from the library's own ``rec_errors``.
"""

import copy
import math
import re
import time

import numpy as np
import pytest
import tensorly as tl
from tensorly.cp_tensor import CPTensor
from tensorly.decomposition import parafac
from tensorly.testing import assert_class_wrapper_correctly_passes_arguments

from tensorly_datc import WeightedCP, weighted_parafac

from helpers import to_numpy

try:
    import torch
except ImportError:  # the numpy tests run without torch
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

# Relative error under which an exactly low-rank tensor counts as recovered. A converged ALS
# reaches about 1e-15 in float64; 1e-8 leaves room for a slowly converging random start.
EXACT_TOL = 1e-8

# Two runs of the same float64 arithmetic in another order (numpy against torch) differ by
# round-off amplified over a few dozen sweeps.
BACKEND_TOL = 1e-8

# Two code paths that should return the same model. Near a minimum the error is quadratic in
# the factors, so runs stopped at a relative decrease of 1e-14 differ by about 1e-7.
SAME_MINIMUM_TOL = 1e-6


# Helpers


def dense_metric(metric, mode_sizes):
    """Return the (D, D) numpy matrix of a metric given in any accepted form."""
    size = math.prod(mode_sizes)
    if metric is None:
        return np.eye(size)
    if isinstance(metric, (list, tuple)):
        matrix = np.ones((1, 1))
        for factor, mode_size in zip(metric, mode_sizes):
            factor = np.eye(mode_size) if factor is None else to_numpy(factor)
            matrix = np.kron(matrix, factor)
        return matrix
    metric = to_numpy(metric)
    if metric.ndim == 1:
        return np.diag(metric)
    return metric


def reconstruct(cp_tensor):
    """Return the full tensor of a CPTensor as a float64 numpy array."""
    weights, factors = cp_tensor
    with tl.backend_context("numpy"):
        return tl.cp_to_tensor((to_numpy(weights), [to_numpy(factor) for factor in factors]))


def metric_error(tensor, cp_tensor, metric=None):
    """Return the relative metric error ``||(X - X~)_(0) M^{1/2}|| / ||X_(0) M^{1/2}||``."""
    tensor = to_numpy(tensor)
    matrix = dense_metric(metric, tensor.shape[1:])
    unfolded = tensor.reshape(tensor.shape[0], -1)
    residual = unfolded - reconstruct(cp_tensor).reshape(tensor.shape[0], -1)
    error = np.sum((residual @ matrix) * residual)
    norm = np.sum((unfolded @ matrix) * unfolded)
    return math.sqrt(max(error, 0.0) / norm)


def random_spd(size, rng):
    """Return a well-conditioned symmetric positive definite matrix of side ``size``."""
    draw = rng.standard_normal((size, size))
    return draw @ draw.T / size + 0.5 * np.eye(size)


def random_factors(shape, rank, rng):
    return [rng.standard_normal((size, rank)) for size in shape]


def low_rank_tensor(shape, rank, rng, noise=0.0):
    """Return an exactly rank-``rank`` float64 tensor, plus Gaussian noise of std ``noise``."""
    tensor = reconstruct((np.ones(rank), random_factors(shape, rank, rng)))
    return tensor + noise * rng.standard_normal(shape)


def column_norms(factor):
    return np.linalg.norm(to_numpy(factor), axis=0)


# Agreement with TensorLy's parafac for the identity metric


@pytest.mark.parametrize("shape, rank", [((7, 6, 5), 3), ((6, 5, 4, 4), 3)])
@pytest.mark.parametrize("n_iter", [1, 5, 20])
def test_identity_metric_matches_parafac(backend, shape, rank, n_iter):
    rng = np.random.default_rng(0)
    tensor = tl.tensor(rng.standard_normal(shape))

    # The rank is below every mode size, so the SVD start is deterministic and shared.
    reference = parafac(tensor, rank, n_iter_max=n_iter, init="svd", tol=0, random_state=0)
    result = weighted_parafac(tensor, rank, n_iter_max=n_iter, init="svd", tol=0, random_state=0)

    # Both run the same ALS sweeps; the proximal term l2_reg=1e-8 moves each step by ~1e-8.
    assert metric_error(tensor, result) <= metric_error(tensor, reference) * (1 + 1e-6)


@pytest.mark.parametrize("shape, rank", [((7, 6, 5), 3), ((5, 4, 6, 3), 4)])
def test_identity_metric_matches_parafac_given_start(backend, shape, rank):
    rng = np.random.default_rng(1)
    tensor = tl.tensor(rng.standard_normal(shape))
    start = CPTensor((tl.ones(rank), [tl.tensor(f) for f in random_factors(shape, rank, rng)]))

    reference = parafac(tensor, rank, n_iter_max=10, init=copy.deepcopy(start), tol=0)
    result = weighted_parafac(tensor, rank, n_iter_max=10, init=copy.deepcopy(start), tol=0)

    assert metric_error(tensor, result) <= metric_error(tensor, reference) * (1 + 1e-6)


# Recovery of exactly low-rank tensors


@pytest.mark.parametrize("shape, rank", [((6, 5, 4), 3), ((5, 4, 3, 3), 3)])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_exact_low_rank_recovered(shape, rank, init):
    rng = np.random.default_rng(2)
    tensor = low_rank_tensor(shape, rank, rng)
    metric = random_spd(math.prod(shape[1:]), rng)

    cp_tensor = weighted_parafac(
        tensor, rank, metric, init=init, random_state=3, n_iter_max=2000, tol=1e-15
    )

    assert [tuple(f.shape) for f in cp_tensor.factors] == [(size, rank) for size in shape]
    assert tuple(cp_tensor.weights.shape) == (rank,)
    assert metric_error(tensor, cp_tensor, metric) < EXACT_TOL


# Metric forms: Kronecker and diagonal against their dense equivalents


@pytest.mark.parametrize("used_modes", [(0, 1), (0,), (1,)], ids=["both", "first", "second"])
def test_kronecker_metric_matches_dense(used_modes):
    rng = np.random.default_rng(4)
    shape, rank = (6, 4, 5), 3
    tensor = low_rank_tensor(shape, rank, rng, noise=0.05)
    kronecker = [random_spd(size, rng) if k in used_modes else None for k, size in enumerate(shape[1:])]
    dense = dense_metric(kronecker, shape[1:])

    # metric_reg=0: the default ridge is added to each Kronecker factor, which is not the same
    # matrix as the ridge added to their product. Both runs go to convergence because the two
    # code paths order their sweeps differently.
    options = dict(init="svd", n_iter_max=500, tol=1e-14, metric_reg=0)
    result_kronecker = weighted_parafac(tensor, rank, kronecker, **options)
    result_dense = weighted_parafac(tensor, rank, dense, **options)

    error_kronecker = metric_error(tensor, result_kronecker, dense)
    error_dense = metric_error(tensor, result_dense, dense)
    assert error_kronecker == pytest.approx(error_dense, rel=SAME_MINIMUM_TOL)
    full_kronecker, full_dense = reconstruct(result_kronecker), reconstruct(result_dense)
    scale = np.abs(full_dense).max()
    assert np.abs(full_kronecker - full_dense).max() <= SAME_MINIMUM_TOL * scale


def test_diagonal_metric_matches_dense():
    rng = np.random.default_rng(5)
    shape, rank = (6, 4, 5), 3
    tensor = low_rank_tensor(shape, rank, rng, noise=0.05)
    weights = rng.uniform(0.1, 2.0, size=20)

    # Both paths run the same sweeps (the diagonal one block by block), so they agree after
    # any number of them, not only at convergence.
    result_diagonal = weighted_parafac(tensor, rank, weights, n_iter_max=8, tol=0)
    result_dense = weighted_parafac(tensor, rank, np.diag(weights), n_iter_max=8, tol=0)

    error_diagonal = metric_error(tensor, result_diagonal, weights)
    error_dense = metric_error(tensor, result_dense, weights)
    assert error_diagonal == pytest.approx(error_dense, rel=SAME_MINIMUM_TOL)
    full_diagonal, full_dense = reconstruct(result_diagonal), reconstruct(result_dense)
    assert np.abs(full_diagonal - full_dense).max() <= SAME_MINIMUM_TOL * np.abs(full_dense).max()


# Backends, determinism and solvers


@requires_torch
@pytest.mark.parametrize("shape, rank", [((6, 4, 5), 3), ((5, 4, 3, 3), 4)])
def test_numpy_and_torch_agree(shape, rank):
    rng = np.random.default_rng(6)
    tensor = low_rank_tensor(shape, rank, rng, noise=0.1)
    metric = random_spd(math.prod(shape[1:]), rng)

    # random_state: rank 4 exceeds the mode of size 3, so the SVD start has random columns.
    options = dict(n_iter_max=30, tol=0, random_state=0)
    result_numpy = weighted_parafac(tensor, rank, metric, **options)
    result_torch = weighted_parafac(torch.from_numpy(tensor), rank, torch.from_numpy(metric), **options)

    assert isinstance(result_torch.weights, torch.Tensor)
    full_numpy, full_torch = reconstruct(result_numpy), reconstruct(result_torch)
    assert np.abs(full_numpy - full_torch).max() <= BACKEND_TOL * np.abs(full_numpy).max()


@pytest.mark.parametrize("metric_kind", ["identity", "dense", "diagonal", "kronecker"])
def test_same_seed_same_result(backend, metric_kind):
    rng = np.random.default_rng(7)
    shape, rank = (6, 4, 5), 3
    tensor = tl.tensor(rng.standard_normal(shape))
    metrics = {
        "identity": None,
        "dense": tl.tensor(random_spd(20, rng)),
        "diagonal": tl.tensor(rng.uniform(0.5, 1.5, size=20)),
        "kronecker": [tl.tensor(random_spd(4, rng)), tl.tensor(random_spd(5, rng))],
    }
    metric = metrics[metric_kind]

    first = weighted_parafac(tensor, rank, metric, init="random", random_state=11, n_iter_max=5)
    second = weighted_parafac(tensor, rank, metric, init="random", random_state=11, n_iter_max=5)

    np.testing.assert_array_equal(to_numpy(first.weights), to_numpy(second.weights))
    for factor_first, factor_second in zip(first.factors, second.factors):
        np.testing.assert_array_equal(to_numpy(factor_first), to_numpy(factor_second))


def test_dense_and_cg_solvers_reach_same_error():
    rng = np.random.default_rng(8)
    shape, rank = (8, 10, 6), 4
    tensor = low_rank_tensor(shape, rank, rng, noise=0.05)
    metric = random_spd(60, rng)

    errors = {}
    for solver in ("dense", "cg"):
        cp_tensor = weighted_parafac(tensor, rank, metric, solver=solver, n_iter_max=200, tol=1e-12)
        errors[solver] = metric_error(tensor, cp_tensor, metric)

    # The conjugate-gradient solves are inexact (relative residual down to 1e-10 near
    # convergence), so the errors of the two converged runs agree to a few digits.
    assert errors["cg"] == pytest.approx(errors["dense"], rel=1e-4)
    # The noise floor: a rank-4 model cannot explain noise of std 0.05.
    assert errors["dense"] < 0.05


# Options: normalize_factors, rec_errors, callback, verbose


@pytest.mark.parametrize("metric_kind", ["identity", "dense"])
def test_normalize_factors_same_reconstruction(metric_kind):
    rng = np.random.default_rng(9)
    shape, rank = (6, 5, 4, 3), 3
    tensor = rng.standard_normal(shape)
    metric = None if metric_kind == "identity" else random_spd(60, rng)

    normalised = weighted_parafac(tensor, rank, metric, n_iter_max=10, normalize_factors=True)
    unnormalised = weighted_parafac(tensor, rank, metric, n_iter_max=10, normalize_factors=False)

    full_normalised, full_unnormalised = reconstruct(normalised), reconstruct(unnormalised)
    assert np.abs(full_normalised - full_unnormalised).max() <= 1e-10 * np.abs(full_normalised).max()
    for factor in normalised.factors:
        np.testing.assert_allclose(column_norms(factor), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(unnormalised.weights), np.ones(rank))


def test_rec_errors_floats_non_increasing(backend):
    rng = np.random.default_rng(10)
    tensor = tl.tensor(rng.standard_normal((6, 5, 4)))
    metric = tl.tensor(random_spd(20, rng))

    cp_tensor, rec_errors = weighted_parafac(tensor, 3, metric, n_iter_max=15, tol=0, return_errors=True)

    assert isinstance(cp_tensor, CPTensor)
    assert isinstance(rec_errors, list)
    assert 1 <= len(rec_errors) <= 15
    assert all(type(error) is float for error in rec_errors)
    assert all(later <= earlier for earlier, later in zip(rec_errors, rec_errors[1:]))
    # The last entry is the error of the returned model, measured in the regularised metric
    # (metric_reg=1e-6 changes it by about that much).
    assert rec_errors[-1] == pytest.approx(metric_error(tensor, cp_tensor, metric), rel=1e-5)


def test_callback_called_each_sweep():
    rng = np.random.default_rng(12)
    tensor = rng.standard_normal((6, 5, 4))
    calls = []

    def record(cp_tensor, rec_error):
        calls.append((cp_tensor, rec_error))

    _, rec_errors = weighted_parafac(tensor, 3, n_iter_max=6, tol=0, callback=record, return_errors=True)

    assert len(rec_errors) == 6
    assert len(calls) == 6
    assert [error for _, error in calls] == rec_errors
    assert all(isinstance(cp_tensor, CPTensor) for cp_tensor, _ in calls)
    assert metric_error(tensor, calls[-1][0]) == pytest.approx(rec_errors[-1], rel=1e-10)


def test_callback_returning_true_stops():
    rng = np.random.default_rng(13)
    tensor = rng.standard_normal((6, 5, 4))
    calls = []

    def stop(cp_tensor, rec_error):
        calls.append(rec_error)
        return True

    _, rec_errors = weighted_parafac(tensor, 3, n_iter_max=20, tol=0, callback=stop, return_errors=True)

    assert len(calls) == 1
    assert len(rec_errors) == 1


def test_verbose_prints_each_sweep(capsys):
    rng = np.random.default_rng(14)
    tensor = rng.standard_normal((6, 5, 4))

    _, rec_errors = weighted_parafac(tensor, 3, n_iter_max=4, tol=0, verbose=1, return_errors=True)

    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(rec_errors) == 4
    for iteration, (line, rec_error) in enumerate(zip(lines, rec_errors), start=1):
        numbers = [float(text) for text in re.findall(r"\d+\.\d+e[+-]\d+", line)]
        assert re.search(rf"\b{iteration}\b", line)
        assert any(number == pytest.approx(rec_error, rel=1e-5) for number in numbers)


def test_verbose_zero_prints_nothing(capsys):
    rng = np.random.default_rng(14)
    weighted_parafac(rng.standard_normal((6, 5, 4)), 3, n_iter_max=4)
    assert capsys.readouterr().out == ""


# dtypes, input safety and backend mismatch


def test_float32_numpy_kept():
    rng = np.random.default_rng(15)
    tensor = rng.standard_normal((6, 5, 4)).astype(np.float32)

    cp_tensor = weighted_parafac(tensor, 3, random_spd(20, rng).astype(np.float32), n_iter_max=5)

    assert cp_tensor.weights.dtype == np.float32
    assert all(factor.dtype == np.float32 for factor in cp_tensor.factors)


@requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_dtype_kept(dtype):
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(16)
    weight = torch.randn(8, 6, 3, 3, generator=generator, dtype=torch.float64)

    # random_state: rank 5 exceeds the kernel modes of size 3, so the start has random columns.
    options = dict(n_iter_max=10, random_state=0)
    low_precision = weighted_parafac(weight.to(dtype), 5, **options)
    reference = weighted_parafac(weight.to(dtype).to(torch.float64), 5, **options)

    assert low_precision.weights.dtype == dtype
    assert all(factor.dtype == dtype for factor in low_precision.factors)
    # The arithmetic is float64 on the rounded input; only the final cast to the narrow dtype
    # (8 mantissa bits for bfloat16) separates the two results.
    full_low, full_reference = reconstruct(low_precision), reconstruct(reference)
    assert np.abs(full_low - full_reference).max() <= 0.05 * np.abs(full_reference).max()


@pytest.mark.parametrize("metric_kind", ["dense", "diagonal", "kronecker"])
def test_inputs_not_modified(backend, metric_kind):
    rng = np.random.default_rng(17)
    shape, rank = (6, 4, 5), 3
    tensor = tl.tensor(rng.standard_normal(shape))
    metrics = {
        "dense": tl.tensor(random_spd(20, rng)),
        "diagonal": tl.tensor(rng.uniform(0.5, 1.5, size=20)),
        "kronecker": [tl.tensor(random_spd(4, rng)), None],
    }
    metric = metrics[metric_kind]
    start = CPTensor((tl.tensor(np.full(rank, 2.0)), [tl.tensor(f) for f in random_factors(shape, rank, rng)]))
    saved = copy.deepcopy((tensor, metric, start))

    weighted_parafac(tensor, rank, metric, init=start, n_iter_max=3, normalize_factors=True)

    np.testing.assert_array_equal(to_numpy(tensor), to_numpy(saved[0]))
    if metric_kind == "kronecker":
        np.testing.assert_array_equal(to_numpy(metric[0]), to_numpy(saved[1][0]))
        assert metric[1] is None
    else:
        np.testing.assert_array_equal(to_numpy(metric), to_numpy(saved[1]))
    np.testing.assert_array_equal(to_numpy(start.weights), to_numpy(saved[2].weights))
    for factor, saved_factor in zip(start.factors, saved[2].factors):
        np.testing.assert_array_equal(to_numpy(factor), to_numpy(saved_factor))


@requires_torch
@pytest.mark.parametrize("global_backend", ["numpy", "pytorch"])
@pytest.mark.parametrize("input_kind", ["numpy", "torch"])
def test_input_backend_not_global_backend(global_backend, input_kind):
    rng = np.random.default_rng(18)
    tensor = rng.standard_normal((6, 4, 3, 3))
    metric = random_spd(36, rng)
    expected = weighted_parafac(tensor, 3, metric, n_iter_max=5)
    if input_kind == "torch":
        tensor, metric = torch.from_numpy(tensor), torch.from_numpy(metric)
    array_type = torch.Tensor if input_kind == "torch" else np.ndarray

    with tl.backend_context(global_backend):
        cp_tensor = weighted_parafac(tensor, 3, metric, n_iter_max=5)
        assert tl.get_backend() == global_backend

    assert isinstance(cp_tensor.weights, array_type)
    assert all(isinstance(factor, array_type) for factor in cp_tensor.factors)
    full, full_expected = reconstruct(cp_tensor), reconstruct(expected)
    assert np.abs(full - full_expected).max() <= BACKEND_TOL * np.abs(full_expected).max()


# Invalid arguments


def _invalid_cases():
    """Return (id, tensor, arguments, exception, message pattern) for each invalid input."""
    rng = np.random.default_rng(19)
    tensor = rng.standard_normal((5, 4, 3))
    good_metric = random_spd(12, rng)
    asymmetric = good_metric.copy()
    asymmetric[0, 1] += 1.0

    # One eigenvalue flipped in sign: the trace stays positive, so only the PSD check can fail.
    eigenvalues, eigenvectors = np.linalg.eigh(good_metric)
    eigenvalues[0] = -eigenvalues[0]
    indefinite = (eigenvectors * eigenvalues) @ eigenvectors.T

    with_nan = good_metric.copy()
    with_nan[2, 2] = np.nan
    nan_tensor = tensor.copy()
    nan_tensor[1, 2, 0] = np.nan
    factors = random_factors((5, 4, 3), 2, rng)

    return [
        ("rank-zero", tensor, dict(rank=0), ValueError, "rank"),
        ("rank-negative", tensor, dict(rank=-2), ValueError, "rank"),
        ("rank-float", tensor, dict(rank=2.5), TypeError, "rank"),
        ("rank-string", tensor, dict(rank="2"), TypeError, "rank"),
        ("init-unknown", tensor, dict(rank=2, init="hosvd"), ValueError, "init.*svd"),
        ("solver-unknown", tensor, dict(rank=2, solver="lu"), ValueError, "solver.*cg"),
        ("l2_reg-negative", tensor, dict(rank=2, l2_reg=-1e-3), ValueError, "l2_reg"),
        ("metric_reg-negative", tensor, dict(rank=2, metric_reg=-1.0), ValueError, "metric_reg"),
        ("tol-negative", tensor, dict(rank=2, tol=-1.0), ValueError, "tol"),
        ("callback-not-callable", tensor, dict(rank=2, callback=3), TypeError, "callback"),
        (
            "init-factor-shape",
            tensor,
            dict(rank=2, init=CPTensor((np.ones(2), [factors[0], factors[1][:3], factors[2]]))),
            ValueError,
            "init.*mode 1",
        ),
        (
            "init-factor-rank",
            tensor,
            dict(rank=3, init=CPTensor((np.ones(2), factors))),
            ValueError,
            "init",
        ),
        ("init-factor-count", tensor, dict(rank=2, init=(np.ones(2), factors[:2])), ValueError, "init"),
        ("init-weights-length", tensor, dict(rank=2, init=(np.ones(3), factors)), ValueError, "init|weights"),
        ("metric-shape", tensor, dict(rank=2, metric=np.eye(11)), ValueError, r"metric.*\(12, 12\)"),
        ("metric-diagonal-length", tensor, dict(rank=2, metric=np.ones(11)), ValueError, "metric.*12"),
        ("metric-diagonal-negative", tensor, dict(rank=2, metric=-np.ones(12)), ValueError, "metric.*negative"),
        ("metric-3d", tensor, dict(rank=2, metric=np.ones((12, 12, 1))), ValueError, "metric"),
        ("metric-asymmetric", tensor, dict(rank=2, metric=asymmetric), ValueError, "metric.*symmetric"),
        ("metric-indefinite", tensor, dict(rank=2, metric=indefinite), ValueError, "metric.*semi-definite"),
        ("metric-nan", tensor, dict(rank=2, metric=with_nan), ValueError, "metric.*NaN"),
        ("metric-zero", tensor, dict(rank=2, metric=np.zeros((12, 12))), ValueError, "metric"),
        ("metric-kronecker-count", tensor, dict(rank=2, metric=[np.eye(4)]), ValueError, "metric.*modes"),
        ("metric-kronecker-shape", tensor, dict(rank=2, metric=[np.eye(4), np.eye(4)]), ValueError, r"metric\[1\].*\(3, 3\)"),
        ("random-state-string", tensor, dict(rank=2, random_state="x"), ValueError, "random_state.*'x'"),
        ("tensor-nan", nan_tensor, dict(rank=2), ValueError, "tensor.*NaN"),
        ("tensor-1d", np.ones(5), dict(rank=1), ValueError, "tensor.*2 modes"),
        ("tensor-empty", np.ones((3, 0, 2)), dict(rank=1), ValueError, "tensor.*empty"),
        ("tensor-list", [[1.0, 2.0], [3.0, 4.0]], dict(rank=1), TypeError, "tensor"),
    ]


INVALID_CASES = _invalid_cases()


@pytest.mark.parametrize(
    "tensor, arguments, exception, pattern",
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_argument_raises(tensor, arguments, exception, pattern):
    with pytest.raises(exception, match=pattern):
        weighted_parafac(tensor, **arguments)


# Class wrapper


def test_class_passes_arguments(monkeypatch):
    # fit_transform always requests the errors to store them, so return_errors is not passed on.
    assert_class_wrapper_correctly_passes_arguments(
        monkeypatch, weighted_parafac, WeightedCP, ignore_args={"return_errors"}, rank=3
    )


def test_class_fit_transform_stores_results():
    rng = np.random.default_rng(20)
    tensor = rng.standard_normal((6, 5, 4))
    metric = random_spd(20, rng)

    model = WeightedCP(3, metric, n_iter_max=7, tol=0)
    cp_tensor = model.fit_transform(tensor)
    expected, expected_errors = weighted_parafac(tensor, 3, metric, n_iter_max=7, tol=0, return_errors=True)

    assert model.decomposition_ is cp_tensor
    assert isinstance(cp_tensor, CPTensor)
    assert model.errors_ == expected_errors
    np.testing.assert_allclose(reconstruct(cp_tensor), reconstruct(expected), rtol=0, atol=1e-12)


# Cases met in practice


def test_conv_weight_return_types():
    rng = np.random.default_rng(21)
    weight = rng.standard_normal((64, 3, 3, 3))

    cp_tensor = weighted_parafac(weight, 16, n_iter_max=5)
    returned = weighted_parafac(weight, 16, n_iter_max=5, return_errors=True)

    assert isinstance(cp_tensor, CPTensor)
    assert [f.shape for f in cp_tensor.factors] == [(64, 16), (3, 16), (3, 16), (3, 16)]
    assert isinstance(returned, tuple) and len(returned) == 2
    assert isinstance(returned[0], CPTensor)
    assert isinstance(returned[1], list)
    assert len(returned[1]) >= 1


@pytest.mark.parametrize("normalize_factors", [False, True])
def test_singular_gram_random_cube(normalize_factors):
    rng = np.random.default_rng(22)
    tensor = rng.standard_normal((8, 8, 8)) / 8

    cp_tensor = weighted_parafac(tensor, 2, normalize_factors=normalize_factors)

    assert np.all(np.isfinite(to_numpy(cp_tensor.weights)))
    assert all(np.all(np.isfinite(f)) for f in cp_tensor.factors)
    assert metric_error(tensor, cp_tensor) < 1.0


@pytest.mark.parametrize("normalize_factors", [False, True])
@pytest.mark.parametrize("metric_kind", ["identity", "dense"])
def test_all_ones_tensor_rank_two(normalize_factors, metric_kind):
    rng = np.random.default_rng(23)
    tensor = np.ones((2, 3, 4))
    # A rank-1 tensor fitted at rank 2: the second rank-one term has nothing to fit, so the
    # Gram matrices of the normal equations are singular.
    metric = None if metric_kind == "identity" else random_spd(12, rng)

    cp_tensor = weighted_parafac(tensor, 2, metric, normalize_factors=normalize_factors)

    assert np.all(np.isfinite(to_numpy(cp_tensor.weights)))
    assert all(np.all(np.isfinite(f)) for f in cp_tensor.factors)
    assert metric_error(tensor, cp_tensor, metric) < EXACT_TOL


def test_rank_above_mode_size():
    rng = np.random.default_rng(24)
    tensor = rng.standard_normal((100, 100, 3)).astype(np.float32)

    cp_tensor, rec_errors = weighted_parafac(tensor, 4, n_iter_max=10, return_errors=True)

    assert [f.shape for f in cp_tensor.factors] == [(100, 4), (100, 4), (3, 4)]
    assert all(f.dtype == np.float32 for f in cp_tensor.factors)
    assert np.all(np.isfinite(cp_tensor.weights))
    # Rank 4 explains little of Gaussian noise, but the fit must at least beat the zero model.
    assert metric_error(tensor, cp_tensor) < 1.0


def test_rank_above_largest_possible_clipped():
    # Every 6x4x3 tensor has a CP rank of at most 4 * 3 = 12.
    rng = np.random.default_rng(25)
    tensor = rng.standard_normal((6, 4, 3))

    with pytest.warns(UserWarning, match=r"rank 500 requested.* at most 12 .*using 12"):
        cp_tensor = weighted_parafac(tensor, 500, n_iter_max=3)

    assert [f.shape for f in cp_tensor.factors] == [(6, 12), (4, 12), (3, 12)]


def test_explicit_start_keeps_its_rank():
    rng = np.random.default_rng(26)
    tensor = rng.standard_normal((3, 2, 2))
    start = CPTensor((np.ones(5), [rng.standard_normal((size, 5)) for size in (3, 2, 2)]))

    cp_tensor = weighted_parafac(tensor, 5, init=start, n_iter_max=2)

    assert [f.shape for f in cp_tensor.factors] == [(3, 5), (2, 5), (2, 5)]


@requires_torch
def test_conv_rank_above_kernel_size(device):
    rng = np.random.default_rng(25)
    weight = torch.tensor(rng.standard_normal((16, 8, 3, 3)), dtype=torch.float32, device=device)
    metric = torch.tensor(random_spd(72, rng), device=device)

    cp_tensor = weighted_parafac(weight, 5, metric, n_iter_max=10)

    assert [tuple(f.shape) for f in cp_tensor.factors] == [(16, 5), (8, 5), (3, 5), (3, 5)]
    assert cp_tensor.weights.dtype == torch.float32
    assert cp_tensor.weights.device.type == device
    for factor in cp_tensor.factors:
        assert factor.dtype == torch.float32
        assert factor.device.type == device
        assert torch.isfinite(factor).all()


@requires_torch
def test_random_init_same_seed_on_device(device):
    generator = torch.Generator().manual_seed(26)
    weight = torch.randn(10, 6, 3, 3, generator=generator, dtype=torch.float64)
    samples = torch.randn(200, 54, generator=generator, dtype=torch.float64)
    metric = samples.T @ samples / 200
    weight, metric = weight.to(device), metric.to(device)

    options = dict(init="random", random_state=27, n_iter_max=5)
    first = weighted_parafac(weight, 4, metric, **options)
    second = weighted_parafac(weight, 4, metric, **options)
    on_cpu = weighted_parafac(weight.cpu(), 4, metric.cpu(), **options)

    for factor_first, factor_second in zip(first.factors, second.factors):
        assert factor_first.device.type == device
        assert torch.equal(factor_first, factor_second)
    # TensorLy draws the random start with numpy on the host and then moves it. So the seed
    # gives the same start on every device, and only float64 round-off separates the results.
    full, full_cpu = reconstruct(first), reconstruct(on_cpu)
    assert np.abs(full - full_cpu).max() <= BACKEND_TOL * np.abs(full_cpu).max()


@requires_torch
def test_exact_rank_three_normalised_finite(device):
    rng = np.random.default_rng(28)
    tensor = torch.tensor(low_rank_tensor((3, 4, 4), 3, rng), device=device)

    for metric in (None, torch.tensor(random_spd(16, rng), device=device)):
        cp_tensor = weighted_parafac(tensor, 3, metric, normalize_factors=True)

        assert torch.isfinite(cp_tensor.weights).all()
        assert all(torch.isfinite(f).all() for f in cp_tensor.factors)
        assert metric_error(tensor, cp_tensor, metric) < 1e-2


@pytest.mark.parametrize("metric_kind", ["identity", "dense"])
def test_border_rank_factors_bounded(metric_kind):
    # a (x) a (x) b + a (x) b (x) a + b (x) a (x) a has rank 3 but is a limit of rank-2
    # tensors, so a rank-2 fit has no minimiser. Plain ALS lets two rank-one terms grow without
    # bound while they cancel: TensorLy 0.10's parafac reaches column norms of 2e15 here.
    rng = np.random.default_rng(29)
    a, b = np.linalg.qr(rng.standard_normal((5, 2)))[0].T
    tensor = (
        np.einsum("i,j,k->ijk", a, a, b)
        + np.einsum("i,j,k->ijk", a, b, a)
        + np.einsum("i,j,k->ijk", b, a, a)
    )
    metric = None if metric_kind == "identity" else random_spd(25, rng)

    spread = weighted_parafac(tensor, 2, metric, n_iter_max=300, tol=0)
    normalised = weighted_parafac(tensor, 2, metric, n_iter_max=300, tol=0, normalize_factors=True)

    for factor in spread.factors:
        assert np.all(np.isfinite(factor))
        assert column_norms(factor).max() < 100.0
    assert np.all(np.isfinite(normalised.weights))
    assert np.abs(normalised.weights).max() < 100.0 * np.linalg.norm(tensor)
    # The infimum of the rank-2 error is 0; the best rank-1 fit has error sqrt(5/9) = 0.75.
    assert metric_error(tensor, spread, metric) < 0.5


# Pretrained ResNet-20: weighted against Frobenius CP on the 3x3 convs of layer2 and layer3

RESNET_LAYERS = [f"layer{stage}.{block}.conv{conv}" for stage in (2, 3) for block in range(3) for conv in (1, 2)]

# Sweeps per decomposition. With 5, the statistics pass and the 48 decompositions of the two
# tests took 17 s of CPU time (one torch thread, two-core x86 VM). The weighted fit's lead
# narrows with more sweeps: the 3-way mean reduction measured 19 % at 5 sweeps, 16 % at 30.
RESNET_N_ITER = 5


@pytest.fixture(scope="module")
def resnet20_layers(data_dir):
    """Return {name: (float64 weight, float64 second moment)} for the layers in RESNET_LAYERS."""
    from tensorly_datc.data import load_cifar10
    from tensorly_datc.models import load_cifar_resnet
    from tensorly_datc.nn import collect_input_statistics

    model = load_cifar_resnet(data_dir / "cifar10_resnets" / "resnet20-12fca82f.th")
    images, _ = load_cifar10(data_dir / "cifar10_calibration.npz", n=500)
    statistics = collect_input_statistics(model, images, layers=RESNET_LAYERS, progress=False)
    modules = dict(model.named_modules())
    return {
        name: (modules[name].weight.detach().to(torch.float64), statistics[name].second_moment)
        for name in RESNET_LAYERS
    }


def half_parameter_rank(shape):
    """Return the CP rank whose factors hold half the parameters of a tensor of ``shape``."""
    return math.floor(0.5 * math.prod(shape) / sum(shape))


@requires_torch
@pytest.mark.data
@pytest.mark.parametrize("form", ["3-way", "4-way"])
def test_resnet20_weighted_beats_frobenius(resnet20_layers, form):
    start = time.perf_counter()
    reductions = []
    for name, (weight, second_moment) in resnet20_layers.items():
        out_channels, in_channels, kernel_height, kernel_width = weight.shape
        if form == "3-way":
            weight = weight.reshape(out_channels, in_channels, kernel_height * kernel_width)
        rank = half_parameter_rank(tuple(weight.shape))

        # random_state: every rank here exceeds the kernel mode, so the SVD start has random
        # columns, and both fits get the same ones.
        options = dict(n_iter_max=RESNET_N_ITER, random_state=0)
        weighted = weighted_parafac(weight, rank, second_moment, **options)
        frobenius = weighted_parafac(weight, rank, **options)

        error_weighted = metric_error(weight, weighted, second_moment)
        error_frobenius = metric_error(weight, frobenius, second_moment)
        reductions.append(1 - error_weighted / error_frobenius)
        print(
            f"{form} {name} rank {rank}: Sigma-error weighted {error_weighted:.4f}, "
            f"Frobenius {error_frobenius:.4f}, reduction {reductions[-1]:.1%}"
        )
        assert error_weighted < error_frobenius, name

    mean_reduction = sum(reductions) / len(reductions)
    print(f"{form}: mean reduction {mean_reduction:.1%} in {time.perf_counter() - start:.1f} s")
    assert mean_reduction >= 0.15
