"""Tests of metric validation, regularisation and products, against dense numpy computations."""

import numpy as np
import pytest
import tensorly as tl

from tensorly_datc.metric import (
    DenseMetric,
    DiagonalMetric,
    IdentityMetric,
    KroneckerMetric,
    as_metric,
    kronecker_approximation,
)

from helpers import to_numpy

try:
    import torch
except ImportError:  # the numpy tests run without torch
    torch = None

# Every quantity is float64 and the matrices are small and well conditioned, so two
# computations of the same product differ only by round-off.
TOL = 1e-12

MODE_SIZES = (4, 3, 2)
SIZE = 24


def _random_spd(size, rng):
    samples = rng.standard_normal((2 * size, size))
    return samples.T @ samples / (2 * size)


def _tensor(rng):
    return tl.tensor(rng.standard_normal((5,) + MODE_SIZES))


def _metric_forms(rng):
    """Return (form name, metric argument, dense equivalent) for every accepted form."""
    dense = _random_spd(SIZE, rng)
    weights = rng.uniform(0.1, 2.0, SIZE)
    factors = [_random_spd(size, rng) for size in MODE_SIZES]
    partial = [factors[0], None, factors[2]]
    return [
        ("identity", None, np.eye(SIZE)),
        ("dense", dense, dense),
        ("diagonal", weights, np.diag(weights)),
        ("kronecker", factors, np.kron(np.kron(factors[0], factors[1]), factors[2])),
        ("kronecker with None", partial, np.kron(np.kron(factors[0], np.eye(3)), factors[2])),
    ]


FORM_NAMES = ["identity", "dense", "diagonal", "kronecker", "kronecker with None"]
KINDS = {"identity": IdentityMetric, "dense": DenseMetric, "diagonal": DiagonalMetric,
         "kronecker": KroneckerMetric, "kronecker with None": KroneckerMetric}


@pytest.mark.parametrize("form", FORM_NAMES)
def test_form_gives_metric_kind(backend, form):
    rng = np.random.default_rng(0)
    cases = {case[0]: case for case in _metric_forms(rng)}
    _, metric, _ = cases[form]

    converted = as_metric(metric, _tensor(rng), metric_reg=0)

    assert isinstance(converted, KINDS[form])
    assert converted.size == SIZE


@pytest.mark.parametrize("form", FORM_NAMES)
def test_products_match_dense(backend, form):
    rng = np.random.default_rng(1)
    cases = {case[0]: case for case in _metric_forms(rng)}
    _, metric, dense = cases[form]
    tensor = _tensor(rng)
    matrix = rng.standard_normal((7, SIZE))

    converted = as_metric(metric, tensor, metric_reg=0)
    product = to_numpy(converted.rmatmul(tl.tensor(matrix)))
    quadratic = float(converted.quadratic(tl.tensor(matrix)))

    np.testing.assert_allclose(product, matrix @ dense, rtol=TOL, atol=TOL)
    assert quadratic == pytest.approx(np.trace(matrix @ dense @ matrix.T), rel=TOL)


def test_dense_ridge_relative_to_mean_eigenvalue():
    rng = np.random.default_rng(2)
    matrix = _random_spd(SIZE, rng)

    converted = as_metric(matrix, _tensor(rng), metric_reg=1e-3)

    expected = matrix + 1e-3 * np.trace(matrix) / SIZE * np.eye(SIZE)
    np.testing.assert_allclose(converted.matrix, expected, rtol=TOL, atol=TOL)


def test_diagonal_ridge_relative_to_mean_weight():
    rng = np.random.default_rng(3)
    weights = rng.uniform(0.0, 2.0, SIZE)
    weights[:3] = 0.0

    converted = as_metric(weights, _tensor(rng), metric_reg=1e-3)

    np.testing.assert_allclose(converted.weights, weights + 1e-3 * weights.mean(), rtol=TOL)


def test_kronecker_ridge_per_factor():
    rng = np.random.default_rng(4)
    factors = [_random_spd(size, rng) for size in MODE_SIZES]

    converted = as_metric(factors, _tensor(rng), metric_reg=1e-3)

    for factor, regularised in zip(factors, converted.factors):
        expected = factor + 1e-3 * np.trace(factor) / len(factor) * np.eye(len(factor))
        np.testing.assert_allclose(regularised, expected, rtol=TOL, atol=TOL)


def test_metric_reg_zero_keeps_singular_metric():
    rng = np.random.default_rng(5)
    samples = rng.standard_normal((5, SIZE))
    singular = samples.T @ samples

    converted = as_metric(singular, _tensor(rng), metric_reg=0)

    np.testing.assert_allclose(converted.matrix, singular, rtol=TOL, atol=TOL)


def test_round_off_accepted():
    # Statistics summed in float64 are symmetric and PSD up to about 1e-15 relative.
    rng = np.random.default_rng(6)
    basis = np.linalg.qr(rng.standard_normal((SIZE, SIZE)))[0]
    eigenvalues = rng.uniform(0.5, 2.0, SIZE)
    eigenvalues[0] = -1e-13
    matrix = (basis * eigenvalues) @ basis.T
    matrix[0, 1] += 1e-13

    converted = as_metric(matrix, _tensor(rng), metric_reg=0)

    np.testing.assert_allclose(converted.matrix, converted.matrix.T, rtol=0, atol=0)


def test_inputs_not_modified_and_float64():
    rng = np.random.default_rng(7)
    matrix = _random_spd(SIZE, rng).astype(np.float32)
    original = matrix.copy()

    converted = as_metric(matrix, _tensor(rng), metric_reg=1e-2)

    np.testing.assert_array_equal(matrix, original)
    assert converted.matrix.dtype == np.float64


def _as_array_type(array, array_type):
    """Return ``array`` as it is ("numpy") or as a torch tensor sharing its memory ("torch")."""
    if array_type == "numpy":
        return array
    if torch is None:
        pytest.skip("torch is not installed")
    return torch.from_numpy(array)


@pytest.mark.parametrize("array_type", ["numpy", "torch"])
def test_large_dense_metric_entries_kept(array_type):
    # Side 1100 spans three of the blocks in which the positive-definiteness check restores
    # the matrix it factorises in place.
    rng = np.random.default_rng(8)
    matrix = _random_spd(1100, rng)
    matrix[0, 1] += 1e-12  # symmetric up to round-off only
    original = matrix.copy()
    argument = _as_array_type(matrix, array_type)
    tensor = _as_array_type(rng.standard_normal((3, 1100)), array_type)

    converted = to_numpy(as_metric(argument, tensor, metric_reg=1e-3).matrix)

    symmetric = (original + original.T) / 2
    off_diagonal = ~np.eye(1100, dtype=bool)
    np.testing.assert_array_equal(converted[off_diagonal], symmetric[off_diagonal])
    shift = 1e-3 * np.trace(original) / 1100
    np.testing.assert_allclose(np.diag(converted), np.diag(original) + shift, rtol=1e-15)
    np.testing.assert_array_equal(to_numpy(argument), original)


@pytest.mark.parametrize("array_type", ["numpy", "torch"])
def test_large_indefinite_metric_raises(array_type):
    rng = np.random.default_rng(9)
    eigenvalues, eigenvectors = np.linalg.eigh(_random_spd(700, rng))
    eigenvalues[0] = -0.1 * eigenvalues.mean()
    matrix = (eigenvectors * eigenvalues) @ eigenvectors.T
    tensor = rng.standard_normal((3, 700))

    with pytest.raises(ValueError, match="positive semi-definite"):
        as_metric(_as_array_type(matrix, array_type), _as_array_type(tensor, array_type))


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("global_backend", ["pytorch", "numpy"])
def test_converted_to_tensor_backend(global_backend):
    # as_metric is public, so it must follow the tensor whatever TensorLy's global backend is.
    rng = np.random.default_rng(8)
    tensor = torch.tensor(rng.standard_normal((5,) + MODE_SIZES), dtype=torch.float32)

    with tl.backend_context(global_backend):
        dense = as_metric(_random_spd(SIZE, rng), tensor)
        kronecker = as_metric([_random_spd(4, rng), None, np.eye(2)], tensor)

    assert isinstance(dense.matrix, torch.Tensor)
    assert dense.matrix.dtype == torch.float64
    assert isinstance(kronecker.factors[0], torch.Tensor)
    assert kronecker.factors[1] is None


def test_square_roots_of_kronecker_factors():
    rng = np.random.default_rng(9)
    factors = [_random_spd(size, rng) for size in MODE_SIZES[:2]] + [None]

    roots, inverse_roots = as_metric(factors, _tensor(rng), metric_reg=0).square_roots()

    for factor, root, inverse_root in zip(factors, roots, inverse_roots):
        if factor is None:
            assert root is None
            assert inverse_root is None
            continue
        np.testing.assert_allclose(root, root.T, atol=TOL)
        np.testing.assert_allclose(root @ root, factor, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(root @ inverse_root, np.eye(len(factor)), atol=1e-10)


def test_kronecker_approximation_exact_up_to_scale():
    rng = np.random.default_rng(10)
    first, rest = _random_spd(4, rng), _random_spd(6, rng)
    dense = np.kron(first, rest)

    metric = as_metric(dense, _tensor(rng), metric_reg=0)
    first_factor, rest_factor = kronecker_approximation(metric, MODE_SIZES)

    approximation = np.kron(first_factor, rest_factor)
    scale = np.sum(approximation * dense) / np.sum(dense * dense)
    np.testing.assert_allclose(approximation, scale * dense, rtol=1e-10, atol=1e-10)


def test_kronecker_approximation_of_diagonal():
    rng = np.random.default_rng(11)
    weights = rng.uniform(0.1, 2.0, SIZE)

    metric = as_metric(weights, _tensor(rng), metric_reg=0)
    first_factor, rest_factor = kronecker_approximation(metric, MODE_SIZES)

    blocks = weights.reshape(4, 6)
    np.testing.assert_allclose(first_factor, np.diag(blocks.mean(axis=1)), rtol=TOL)
    np.testing.assert_allclose(rest_factor, np.diag(blocks.mean(axis=0)), rtol=TOL)


def _invalid_cases():
    rng = np.random.default_rng(12)
    spd = _random_spd(SIZE, rng)
    asymmetric = spd.copy()
    asymmetric[0, 1] += 1.0
    eigenvalues, eigenvectors = np.linalg.eigh(spd)
    eigenvalues[0] = -eigenvalues[-1]
    indefinite = (eigenvectors * eigenvalues) @ eigenvectors.T
    infinite = spd.copy()
    infinite[2, 2] = np.inf
    return {
        "wrong side": (np.eye(SIZE - 1), r"shape \(24, 24\); got shape \(23, 23\)"),
        "asymmetric": (asymmetric, "metric must be symmetric"),
        "indefinite": (indefinite, "positive semi-definite"),
        "infinite": (infinite, "metric contains NaN or infinite"),
        "zero": (np.zeros((SIZE, SIZE)), "positive trace"),
        "negative weight": (np.r_[-1.0, np.ones(SIZE - 1)], "non-negative"),
        "NaN weight": (np.r_[np.nan, np.ones(SIZE - 1)], "NaN"),
        "3-way": (np.ones((2, 3, 4)), "got an array of shape"),
        "string": ("identity", "got a str"),
        "Kronecker too long": ([np.eye(4), None, None, None], "got a list of 4 entries"),
        "Kronecker factor wrong side": ([np.eye(3), None, None], r"metric\[0\] \(mode 1\)"),
        "Kronecker factor asymmetric": ([np.triu(np.ones((4, 4))), None, None],
                                        r"metric\[0\] \(mode 1\) must be symmetric"),
    }


@pytest.mark.parametrize("case", list(_invalid_cases()))
def test_invalid_metric_raises(case):
    metric, match = _invalid_cases()[case]
    with pytest.raises(ValueError, match=match):
        as_metric(metric, _tensor(np.random.default_rng(13)))


@pytest.mark.parametrize("metric_reg", [-1e-3, float("inf"), float("nan"), "1e-3"])
def test_invalid_metric_reg_raises(metric_reg):
    with pytest.raises(ValueError, match="metric_reg"):
        as_metric(None, _tensor(np.random.default_rng(14)), metric_reg=metric_reg)


def test_negative_trace_message_not_zero():
    # -I has a negative trace but is not zero, so the message must not call it zero.
    with pytest.raises(ValueError, match="metric") as error:
        as_metric(-np.eye(SIZE), _tensor(np.random.default_rng(15)))
    assert "is zero" not in str(error.value)


@pytest.mark.parametrize("form", ["dense", "diagonal", "kronecker"])
def test_metric_on_other_device_raises(device, form):
    if not torch.cuda.is_available():
        pytest.skip("a second device needs CUDA")
    other = "cpu" if device == "cuda" else "cuda"
    rng = np.random.default_rng(16)
    tensor = torch.tensor(rng.standard_normal((5,) + MODE_SIZES), device=device)
    cases = {case[0]: case[1] for case in _metric_forms(rng)}
    metric = cases[form]
    if isinstance(metric, list):
        metric = [torch.tensor(factor, device=other) for factor in metric]
    else:
        metric = torch.tensor(metric, device=other)

    with pytest.raises(ValueError, match="device"):
        as_metric(metric, tensor)


@pytest.mark.parametrize("array_type", ["numpy", "torch"])
@pytest.mark.parametrize("entry", [(1099, 3), (3, 1099), (600, 599)], ids=str)
def test_asymmetry_found_in_any_tile(array_type, entry):
    # Side 1100 leaves a partial tile at the end of each row of tiles. One asymmetric pair
    # anywhere must be found.
    rng = np.random.default_rng(9)
    matrix = _random_spd(1100, rng)
    matrix[entry] += 1e-3 * np.abs(matrix).max()
    tensor = _as_array_type(rng.standard_normal((3, 1100)), array_type)

    with pytest.raises(ValueError, match="metric must be symmetric"):
        as_metric(_as_array_type(matrix, array_type), tensor)



@pytest.mark.parametrize("array_type", ["numpy", "torch"])
def test_float32_rounding_asymmetry_accepted(array_type):
    # A float32 metric summed from batch products is symmetric only to float32 rounding, so its
    # symmetric part is used. The same relative asymmetry in float64 is a wrong input.
    rng = np.random.default_rng(10)
    matrix = _random_spd(50, rng)
    matrix[3, 7] += 5e-7 * np.abs(matrix).max()
    tensor = _as_array_type(rng.standard_normal((2, 50)), array_type)

    as_metric(_as_array_type(matrix.astype(np.float32), array_type), tensor)
    with pytest.raises(ValueError, match=r"at most 1e-08 times max \|M\| is accepted.*\(M \+ M.T\) / 2"):
        as_metric(_as_array_type(matrix, array_type), tensor)
