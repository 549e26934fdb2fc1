"""Property tests: invariants of the weighted decompositions and layer builders on random inputs.

Hypothesis draws tensors of order 3 and 4 with small modes, ranks, metrics in every accepted
form (none, dense positive definite, singular positive semi-definite, diagonal, Kronecker list)
and random Conv2d geometries. Each test states one property that must hold for every draw, on
the numpy and the pytorch backend where the function takes both. Errors are recomputed here from the returned factors with a
dense copy of the metric, never read from the library alone.
"""

import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import tensorly as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorly.cp_tensor import CPTensor

from tensorly_datc import weighted_parafac, weighted_tucker2

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_datc.nn import (  # noqa: E402
    InputStatistics,
    collect_input_statistics,
    compress,
    low_rank_factors,
    ranks_for_ratio,
    tucker2_conv,
)

from helpers import to_numpy  # noqa: E402

# The `backend` fixture only switches TensorLy's global backend and restores it, so the tests
# that take it may reuse it across the examples of one test.
PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

METRIC_FORMS = ["none", "dense", "singular", "diagonal", "kronecker"]

# An exact model is recovered up to float64 round-off (about 1e-15), amplified by the condition
# number of the drawn metrics.
EXACT_TOL = 1e-8

# Two routes to the same optimum (the identity as a matrix, a vector or a Kronecker list, and
# None) agree to the accuracy at which the sweeps stop, far above round-off.
SAME_OPTIMUM_TOL = 1e-6

# Runs the sweeps to convergence, so that two routes are compared at an optimum.
CONVERGED = dict(tol=1e-12, n_iter_max=500)


@pytest.fixture(autouse=True)
def single_thread():
    """Run torch on one thread, because the matrices are tiny and extra threads only wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Helpers


def to_backend(value):
    """Convert a numpy array, or each array of a Kronecker list, to the active TensorLy backend."""
    if value is None:
        return None
    if isinstance(value, list):
        return [None if factor is None else tl.tensor(factor) for factor in value]
    return tl.tensor(value)


def random_spd(size, rng, n_samples=None):
    """Return the second moment of ``n_samples`` Gaussian samples, singular when fewer than ``size``."""
    n_samples = 2 * size + 2 if n_samples is None else n_samples
    samples = rng.standard_normal((n_samples, size))
    return samples.T @ samples / n_samples


def make_metric(form, mode_sizes, rng):
    """Return a metric of the named form as numpy arrays (None for the identity)."""
    size = math.prod(mode_sizes)
    if form == "none":
        return None
    if form == "dense":
        return random_spd(size, rng)
    if form == "singular":
        # Fewer samples than features: rank at most size // 2, with exact zero eigenvalues.
        return random_spd(size, rng, n_samples=max(1, size // 2))
    if form == "diagonal":
        weights = rng.uniform(0.1, 2.0, size)
        weights[rng.random(size) < 0.2] = 0.0
        weights[0] = 1.0
        return weights
    if form == "kronecker":
        factors = [random_spd(mode_size, rng) for mode_size in mode_sizes]
        factors[-1] = None
        return factors
    raise ValueError(f"unknown metric form {form!r}")


def ridged(matrix, metric_reg):
    """Return ``matrix`` plus ``metric_reg`` times its mean eigenvalue on the diagonal."""
    return matrix + metric_reg * np.trace(matrix) / len(matrix) * np.eye(len(matrix))


def dense_metric(metric, mode_sizes, metric_reg=0.0):
    """Return the dense (D, D) matrix of a metric in any accepted form.

    With ``metric_reg``, the ridge is added as the library documents it: relative to the mean
    eigenvalue of the matrix, or of each Kronecker factor.
    """
    size = math.prod(mode_sizes)
    if metric is None:
        return np.eye(size)
    if isinstance(metric, list):
        matrix = np.ones((1, 1))
        for factor, mode_size in zip(metric, mode_sizes):
            factor = np.eye(mode_size) if factor is None else ridged(to_numpy(factor), metric_reg)
            matrix = np.kron(matrix, factor)
        return matrix
    metric = to_numpy(metric)
    if metric.ndim == 1:
        return np.diag(metric + metric_reg * metric.mean())
    return ridged(metric, metric_reg)


def scale_metric(metric, factor):
    """Return ``metric`` multiplied by ``factor`` (for a Kronecker list, its first matrix)."""
    if metric is None:
        return None
    if isinstance(metric, list):
        return [metric[0] * factor] + metric[1:]
    return metric * factor


def tucker2_tensor(core, factors):
    with tl.backend_context("numpy"):
        return tl.tenalg.multi_mode_dot(to_numpy(core), [to_numpy(f) for f in factors], modes=[0, 1])


def cp_tensor_full(cp_tensor):
    weights, factors = cp_tensor
    with tl.backend_context("numpy"):
        return tl.cp_to_tensor((to_numpy(weights), [to_numpy(f) for f in factors]))


def relative_metric_error(tensor, approximation, metric, metric_reg=0.0):
    """Return ``||(X - X~)_(0) L|| / ||X_(0) L||`` with ``L L^T`` the dense (ridged) metric."""
    tensor = to_numpy(tensor)
    matrix = dense_metric(metric, tensor.shape[1:], metric_reg)
    unfolded = tensor.reshape(tensor.shape[0], -1)
    residual = unfolded - np.reshape(approximation, unfolded.shape)
    error = np.sum((residual @ matrix) * residual)
    norm = np.sum((unfolded @ matrix) * unfolded)
    return math.sqrt(max(error, 0.0) / norm)


def relative_difference(first, second):
    first, second = to_numpy(first), to_numpy(second)
    return np.linalg.norm(first - second) / max(np.linalg.norm(second), 1e-300)


def all_finite(arrays):
    return all(np.all(np.isfinite(to_numpy(array))) for array in arrays)


def arrays_identical(first, second):
    """Return True when two arrays of the same backend are bit-identical."""
    if isinstance(first, torch.Tensor):
        return torch.equal(first, second)
    return np.array_equal(first, second)


def non_increasing(errors):
    return all(later <= earlier for earlier, later in zip(errors, errors[1:]))


# Strategies


@st.composite
def problems(draw, forms=tuple(METRIC_FORMS)):
    """Draw (tensor as numpy, Tucker-2 ranks, CP rank, metric form, metric, rng)."""
    order = draw(st.sampled_from([3, 4]))
    shape = tuple(draw(st.integers(2, 5)) for _ in range(order))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    form = draw(st.sampled_from(forms))
    ranks = (draw(st.integers(1, shape[0])), draw(st.integers(1, shape[1])))
    cp_rank = draw(st.integers(1, 4))
    tensor = rng.standard_normal(shape)
    return tensor, ranks, cp_rank, form, make_metric(form, shape[1:], rng), rng


def low_rank_problem(shape, ranks, rng, noise=0.05):
    """Return an exact Tucker-2 tensor of ``ranks`` plus Gaussian noise of relative size ``noise``."""
    core = rng.standard_normal(tuple(ranks) + tuple(shape[2:]))
    factors = [rng.standard_normal((shape[0], ranks[0])), rng.standard_normal((shape[1], ranks[1]))]
    tensor = tucker2_tensor(core, factors)
    return tensor + noise * np.linalg.norm(tensor) / math.sqrt(tensor.size) * rng.standard_normal(shape)


# Monotone errors


@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(problem=problems(), init=st.sampled_from(["svd", "random", "whitened"]))
def test_tucker2_rec_errors_never_increase(backend, problem, init):
    tensor, ranks, _, _, metric, _ = problem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank clipped to the multilinear limit
        (core, factors), rec_errors = weighted_tucker2(
            tl.tensor(tensor), ranks, to_backend(metric), init=init, random_state=0, tol=0,
            n_iter_max=15,
        )

    assert non_increasing(rec_errors)
    assert all(0 <= error <= 1 + 1e-12 for error in rec_errors)
    # The best model is the one returned, so its recomputed error is the last one reported. The
    # library measures it in the metric with its default ridge of 1e-6.
    error = relative_metric_error(tensor, tucker2_tensor(core, factors), metric, metric_reg=1e-6)
    assert error == pytest.approx(rec_errors[-1], rel=1e-6, abs=1e-7)


@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(problem=problems(), init=st.sampled_from(["svd", "random", "whitened"]),
       normalize_factors=st.booleans())
def test_cp_rec_errors_never_increase(backend, problem, init, normalize_factors):
    tensor, _, rank, _, metric, _ = problem

    cp_tensor, rec_errors = weighted_parafac(
        tl.tensor(tensor), rank, to_backend(metric), init=init, random_state=0, tol=0,
        n_iter_max=15, normalize_factors=normalize_factors, return_errors=True,
    )

    assert non_increasing(rec_errors)
    error = relative_metric_error(tensor, cp_tensor_full(cp_tensor), metric, metric_reg=1e-6)
    assert error == pytest.approx(rec_errors[-1], rel=1e-6, abs=1e-7)


# The identity metric is the Frobenius norm


def identity_in_form(form, mode_sizes):
    size = math.prod(mode_sizes)
    if form == "dense":
        return np.eye(size)
    if form == "diagonal":
        return np.ones(size)
    return [np.eye(mode_size) for mode_size in mode_sizes]


@settings(max_examples=20, **PROPERTY_SETTINGS)
@given(data=st.data(), form=st.sampled_from(["dense", "diagonal", "kronecker"]))
def test_identity_metric_tucker2_matches_frobenius(backend, data, form):
    order = data.draw(st.sampled_from([3, 4]))
    shape = tuple(data.draw(st.integers(2, 5)) for _ in range(order))
    ranks = (data.draw(st.integers(1, shape[0])), data.draw(st.integers(1, shape[1])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # A low-rank tensor plus noise has a clear gap after the ranks, so both routes reach the
    # same (global) optimum instead of two different local ones.
    tensor = low_rank_problem(shape, ranks, rng)
    identity = identity_in_form(form, shape[1:])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (core, factors), _ = weighted_tucker2(tl.tensor(tensor), ranks, to_backend(identity),
                                              **CONVERGED)
        (reference_core, reference_factors), _ = weighted_tucker2(tl.tensor(tensor), ranks, None,
                                                                  **CONVERGED)

    error = relative_metric_error(tensor, tucker2_tensor(core, factors), None)
    reference = relative_metric_error(tensor, tucker2_tensor(reference_core, reference_factors), None)
    assert error == pytest.approx(reference, rel=SAME_OPTIMUM_TOL, abs=1e-12)


@settings(max_examples=15, **PROPERTY_SETTINGS)
@given(data=st.data(), form=st.sampled_from(["dense", "diagonal", "kronecker"]))
def test_identity_metric_cp_matches_frobenius(backend, data, form):
    order = data.draw(st.sampled_from([3, 4]))
    shape = tuple(data.draw(st.integers(3, 5)) for _ in range(order))
    # A rank below every mode size keeps the CP model essentially unique, so ALS converges
    # linearly. Higher ranks on these small tensors meet swamps, where both runs reach the
    # iteration limit while still converging, at different points.
    rank = data.draw(st.integers(1, min(shape) - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    true_factors = [rng.standard_normal((size, rank)) for size in shape]
    tensor = cp_tensor_full((np.ones(rank), true_factors))
    tensor = tensor + 0.01 * np.linalg.norm(tensor) / math.sqrt(tensor.size) * rng.standard_normal(shape)
    # Both runs start from the same factors, near the generating ones, so they converge to the
    # same minimum even though CP has many.
    start = CPTensor((None, [to_backend(f + 0.1 * rng.standard_normal(f.shape)) for f in true_factors]))
    identity = identity_in_form(form, shape[1:])

    cp_tensor = weighted_parafac(tl.tensor(tensor), rank, to_backend(identity), init=start,
                                 **CONVERGED)
    reference = weighted_parafac(tl.tensor(tensor), rank, None, init=start, **CONVERGED)

    error = relative_metric_error(tensor, cp_tensor_full(cp_tensor), None)
    reference_error = relative_metric_error(tensor, cp_tensor_full(reference), None)
    assert error == pytest.approx(reference_error, rel=SAME_OPTIMUM_TOL, abs=1e-10)


# Full ranks are exact


@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(problem=problems())
def test_tucker2_full_ranks_reconstruct_exactly(backend, problem):
    tensor, _, _, _, metric, _ = problem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ranks clipped to the multilinear limit
        (core, factors), rec_errors = weighted_tucker2(tl.tensor(tensor), tensor.shape[:2],
                                                       to_backend(metric), n_iter_max=3)

    assert relative_difference(tucker2_tensor(core, factors), tensor) < EXACT_TOL
    assert rec_errors[-1] < EXACT_TOL


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), columns=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
       form=st.sampled_from(["none", "dense", "singular"]))
def test_low_rank_factors_full_rank_exact(rows, columns, seed, form):
    rng = np.random.default_rng(seed)
    matrix = torch.tensor(rng.standard_normal((rows, columns)))
    metric = make_metric(form, (columns,), rng)
    second_moment = None if metric is None else torch.tensor(metric)

    # Rank T (the number of rows) keeps every output direction, whatever the metric.
    left, right = low_rank_factors(matrix, rows, second_moment)

    assert tuple(left.shape) == (rows, rows)
    assert tuple(right.shape) == (rows, columns)
    assert relative_difference(left @ right, matrix) < EXACT_TOL
    if form != "singular":
        # With a definite metric, rank min(T, D) is already exact.
        rank = min(rows, columns)
        left, right = low_rank_factors(matrix, rank, second_moment)
        assert relative_difference(left @ right, matrix) < EXACT_TOL


# Singular metrics


@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(problem=problems(forms=("singular", "diagonal", "kronecker")),
       metric_reg=st.sampled_from([0.0, 1e-6]), init=st.sampled_from(["svd", "random", "whitened"]))
def test_rank_deficient_metric_gives_finite_factors(backend, problem, metric_reg, init):
    tensor, ranks, rank, form, metric, rng = problem
    if form == "kronecker":
        # One singular factor: a mode-1 matrix of rank 1.
        vector = rng.standard_normal((tensor.shape[1], 1))
        metric = [vector @ vector.T] + metric[1:]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (core, factors), rec_errors = weighted_tucker2(
            tl.tensor(tensor), ranks, to_backend(metric), init=init, random_state=1,
            metric_reg=metric_reg, n_iter_max=10,
        )
    cp_tensor, cp_errors = weighted_parafac(
        tl.tensor(tensor), rank, to_backend(metric), init=init, random_state=1,
        metric_reg=metric_reg, n_iter_max=10, return_errors=True,
    )

    assert all_finite([core, *factors])
    assert all(math.isfinite(error) for error in rec_errors)
    assert all_finite([cp_tensor.weights, *cp_tensor.factors])
    assert all(math.isfinite(error) for error in cp_errors)


# Factorised layers at full rank


@st.composite
def conv_geometries(draw):
    """Draw Conv2d constructor arguments and an input shape that the layer accepts."""
    kernel_size = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if stride == (1, 1) and draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    span = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation)]
    # Reflect padding needs more input pixels than the padding, and the kernel must fit.
    size = [draw(st.integers(max(s, 3), s + 6)) for s in span]
    arguments = dict(
        in_channels=draw(st.integers(1, 5)), out_channels=draw(st.integers(1, 5)),
        kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
        bias=draw(st.booleans()), padding_mode=padding_mode,
    )
    return arguments, (2, arguments["in_channels"], *size)


@settings(max_examples=60, deadline=None)
@given(geometry=conv_geometries(), seed=st.integers(0, 2**16))
def test_tucker2_conv_full_rank_matches_layer(geometry, seed):
    arguments, input_shape = geometry
    torch.manual_seed(seed)
    conv = nn.Conv2d(**arguments, dtype=torch.float64)
    x = torch.randn(input_shape, dtype=torch.float64)
    out_channels, in_channels = conv.weight.shape[:2]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (core, factors), _ = weighted_tucker2(conv.weight.detach(), (out_channels, in_channels),
                                              n_iter_max=2)
    stack = tucker2_conv(conv, core, factors)

    with torch.no_grad():
        expected = conv(x)
        output = stack(x)
    assert output.shape == expected.shape
    assert (stack[-1].bias is not None) == arguments["bias"]
    scale = max(float(expected.abs().max()), 1.0)
    assert float((output - expected).abs().max()) <= 1e-10 * scale


# Determinism


@settings(max_examples=20, **PROPERTY_SETTINGS)
@given(problem=problems(), init=st.sampled_from(["random", "svd", "whitened"]))
def test_same_seed_bit_identical(backend, problem, init):
    tensor, ranks, rank, _, metric, _ = problem
    tensor, metric = tl.tensor(tensor), to_backend(metric)
    options = dict(init=init, random_state=7, n_iter_max=5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (core, factors), errors = weighted_tucker2(tensor, ranks, metric, **options)
        (core_again, factors_again), errors_again = weighted_tucker2(tensor, ranks, metric, **options)
    cp_tensor, cp_errors = weighted_parafac(tensor, rank, metric, return_errors=True, **options)
    cp_again, cp_errors_again = weighted_parafac(tensor, rank, metric, return_errors=True, **options)

    assert errors == errors_again
    assert arrays_identical(core, core_again)
    assert all(arrays_identical(f, g) for f, g in zip(factors, factors_again))
    assert cp_errors == cp_errors_again
    assert arrays_identical(cp_tensor.weights, cp_again.weights)
    assert all(arrays_identical(f, g) for f, g in zip(cp_tensor.factors, cp_again.factors))


# Scale invariance

# Powers of two scale every floating-point operation exactly. A scale-invariant algorithm then
# gives the same numbers up to round-off, while an absolute constant anywhere in it (a floor, an
# unscaled start) shows as a difference many orders of magnitude larger. Other factors would
# also move the iteration at which the tolerance stops a slowly converging run.
SCALES = st.sampled_from([2.0**-10, 2.0**-3, 2.0**5, 2.0**10])
# LAPACK's eigensolvers rescale their input internally, so even power-of-two scaling agrees
# only to round-off amplified by the sweeps (seen up to about 3e-8), not bit for bit. A scale
# dependence (an absolute constant somewhere) shows as differences of 1e-5 and more.
SCALE_TOL = 1e-6
# Relative errors of near-exact fits are only known to about 1e-9 absolute: they come from
# differences of float64 sums of squares.
ERROR_FLOOR = 1e-9


def fit_tucker2_quietly(tensor, ranks, metric):
    """Return ``weighted_tucker2``'s result for the scale tests, without its rank warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return weighted_tucker2(tl.tensor(tensor), ranks, to_backend(metric), n_iter_max=20,
                                random_state=0)


@settings(max_examples=20, **PROPERTY_SETTINGS)
@given(problem=problems(), scale=SCALES)
def test_tucker2_scaled_weight_scales_model(backend, problem, scale):
    tensor, ranks, _, _, metric, _ = problem

    (core, factors), errors = fit_tucker2_quietly(tensor, ranks, metric)
    (scaled_core, scaled_factors), scaled_errors = fit_tucker2_quietly(scale * tensor, ranks, metric)

    reconstruction = tucker2_tensor(core, factors)
    assert relative_difference(tucker2_tensor(scaled_core, scaled_factors), scale * reconstruction) < SCALE_TOL
    # The factors are orthonormal, so the whole scale sits in the core.
    assert relative_difference(scaled_core, scale * to_numpy(core)) < SCALE_TOL
    # An exact fit stops on round-off noise, maybe a sweep earlier, so only the final errors match.
    assert scaled_errors[-1] == pytest.approx(errors[-1], rel=SCALE_TOL, abs=ERROR_FLOOR)


@settings(max_examples=20, **PROPERTY_SETTINGS)
@given(problem=problems(), scale=SCALES)
def test_tucker2_scaled_metric_same_model(backend, problem, scale):
    tensor, ranks, _, _, metric, _ = problem

    (core, factors), errors = fit_tucker2_quietly(tensor, ranks, metric)
    (scaled_core, scaled_factors), scaled_errors = fit_tucker2_quietly(
        tensor, ranks, scale_metric(metric, scale)
    )

    reconstruction = tucker2_tensor(core, factors)
    assert relative_difference(tucker2_tensor(scaled_core, scaled_factors), reconstruction) < SCALE_TOL
    # An exact fit stops on round-off noise, maybe a sweep earlier, so only the final errors match.
    assert scaled_errors[-1] == pytest.approx(errors[-1], rel=SCALE_TOL, abs=ERROR_FLOOR)


@settings(max_examples=20, **PROPERTY_SETTINGS)
@given(problem=problems(), scale=SCALES, init=st.sampled_from(["svd", "random"]))
def test_cp_scale_invariant(backend, problem, scale, init):
    tensor, _, rank, _, metric, _ = problem
    options = dict(init=init, random_state=0, n_iter_max=5, tol=0, return_errors=True)

    cp_tensor, errors = weighted_parafac(tl.tensor(tensor), rank, to_backend(metric), **options)
    scaled_weight, scaled_weight_errors = weighted_parafac(
        tl.tensor(scale * tensor), rank, to_backend(metric), **options
    )
    scaled_metric, scaled_metric_errors = weighted_parafac(
        tl.tensor(tensor), rank, to_backend(scale_metric(metric, scale)), **options
    )

    reconstruction = cp_tensor_full(cp_tensor)
    assert relative_difference(cp_tensor_full(scaled_weight), scale * reconstruction) < SCALE_TOL
    assert relative_difference(cp_tensor_full(scaled_metric), reconstruction) < SCALE_TOL
    assert scaled_weight_errors[-1] == pytest.approx(errors[-1], rel=SCALE_TOL, abs=ERROR_FLOOR)
    assert scaled_metric_errors[-1] == pytest.approx(errors[-1], rel=SCALE_TOL, abs=ERROR_FLOOR)


def small_cnn(seed, scale=1.0):
    """Return a CNN with two 3x3 convolutions and a 1x1 one, its parameters times ``scale``."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 4, 3, padding=1),
        relu=nn.ReLU(),
        body=nn.Conv2d(4, 6, 3, padding=1),
        mix=nn.Conv2d(6, 5, 1),
    )).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), scale=SCALES)
def test_compress_ranks_scale_invariant(seed, scale):
    model = small_cnn(seed)
    inputs = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    statistics = collect_input_statistics(model, inputs, progress=False)
    scaled_statistics = {
        name: InputStatistics(layer.second_moment * scale, layer.mean * math.sqrt(scale), layer.count)
        for name, layer in statistics.items()
    }
    # Tucker-2 and the low-rank pair are deterministic, so any change of rank comes from the scale.
    options = dict(method="tucker2", layers="all", progress=False)

    _, report = compress(model, statistics, budget=0.5, **options)
    _, metric_report = compress(model, scaled_statistics, budget=0.5, **options)
    _, weight_report = compress(small_cnn(seed, scale), statistics, budget=0.5, **options)
    _, ratio_report = compress(small_cnn(seed, scale), scaled_statistics, param_ratio=0.4, **options)

    ranks = [row.rank for row in report.layers]
    assert [row.rank for row in metric_report.layers] == ranks
    assert [row.rank for row in weight_report.layers] == ranks
    for row in ratio_report.layers:
        weight_shape = tuple(model.get_submodule(row.name).weight.shape)
        method = "tucker2" if weight_shape[2:] != (1, 1) else "lowrank"
        if method == "lowrank":
            weight_shape = weight_shape[:2]
        assert row.rank == ranks_for_ratio(method, weight_shape, 0.4)
    for row, metric_row, weight_row in zip(report.layers, metric_report.layers, weight_report.layers):
        assert metric_row.metric_error == pytest.approx(row.metric_error, rel=1e-5)
        assert weight_row.metric_error == pytest.approx(row.metric_error, rel=1e-5)
