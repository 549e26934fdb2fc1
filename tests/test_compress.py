"""Tests of whole-model compression: layer selection, ranks, metric errors, the report and export."""

import copy
import json
import math
import time
from collections import OrderedDict

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_datc.data import evaluate_accuracy, load_cifar10  # noqa: E402
from tensorly_datc.models import load_cifar_resnet, load_digits_split, train_digits_cnn  # noqa: E402
from tensorly_datc.nn import (  # noqa: E402
    collect_input_statistics,
    compress,
    factorise_layer,
    factorised_parameters,
    low_rank_factors,
    ranks_for_ratio,
)

# float32 outputs of these layers are O(1), so 1e-4 leaves room for the rounding of the few
# hundred products that each of the two or three stacked layers adds up.
OUTPUT_ATOL = 1e-4

# The report computes its errors from the float64 approximation and the tests from the float32
# weights of the new layers. Their relative rounding of about 1e-7 changes an error of about 0.1
# by about 1e-6.
ERROR_RTOL = 1e-4

# Single-layer geometries that decomposition tools have handled wrongly (large stride, even
# kernel with 'same', dilation, no bias, asymmetric kernel and stride, 1x1, Linear), as
# (id, layer factory, input shape, expected output shape, calibration samples). The
# calibration sets give more patches than features, so that Sigma is positive definite.
FULL_RANK_CASES = [
    ("stride-4-kernel-11", lambda: nn.Conv2d(3, 64, 11, stride=4, padding=2), (1, 3, 224, 224), (1, 64, 55, 55), 1),
    ("even-kernel-same", lambda: nn.Conv2d(32, 64, 4, padding="same"), (2, 32, 9, 10), (2, 64, 9, 10), 8),
    ("dilation-2", lambda: nn.Conv2d(64, 64, 3, dilation=2, padding=2), (1, 64, 12, 12), (1, 64, 12, 12), 8),
    ("no-bias", lambda: nn.Conv2d(16, 32, 3, bias=False), (2, 16, 10, 10), (2, 32, 8, 8), 8),
    ("asymmetric", lambda: nn.Conv2d(16, 16, (3, 5), padding=(1, 2), stride=(2, 1)), (1, 16, 11, 13), (1, 16, 6, 13), 8),
    ("conv-1x1", lambda: nn.Conv2d(192, 160, 1), (1, 192, 6, 6), (1, 160, 6, 6), 8),
    ("linear", lambda: nn.Linear(48, 20), (5, 48), (5, 20), 100),
]
FULL_RANK_IDS = [case[0] for case in FULL_RANK_CASES]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run torch on one thread, restoring the previous count afterwards.

    The layers here are small, so a second thread gains little, and on a machine whose cores
    are busy with other work the threads' synchronisation made these tests 10 to 100 times
    slower (measured on a shared 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_input(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def layer_output(model, name, inputs):
    """Return the output of the module ``name`` of ``model`` on ``inputs``."""
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda module, args, output: captured.setdefault("output", output.detach())
    )
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return captured["output"]


def orthonormal_columns(rows, columns, generator):
    matrix = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(matrix).Q


def set_low_multilinear_rank(conv, rank, seed=0):
    """Overwrite a conv weight with one of exact Tucker-2 rank ``rank`` and default-init scale."""
    generator = torch.Generator().manual_seed(seed)
    out_channels, in_channels, kernel_height, kernel_width = conv.weight.shape
    output_factor = orthonormal_columns(out_channels, rank[0], generator)
    input_factor = orthonormal_columns(in_channels, rank[1], generator)
    core = torch.randn((rank[0], rank[1], kernel_height, kernel_width), generator=generator, dtype=torch.float64)
    weight = torch.einsum("ta,abij,sb->tsij", output_factor, core, input_factor)
    weight *= (1 / math.sqrt(in_channels * kernel_height * kernel_width)) / weight.std()
    with torch.no_grad():
        conv.weight.copy_(weight)


def set_low_rank(layer, rank, seed=0):
    """Overwrite a Linear or 1x1 conv weight with one of exact matrix rank ``rank``."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = layer.weight.shape[:2]
    weight = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
    weight *= (1 / math.sqrt(in_features)) / weight.std()
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))


def recompose_weight(stack, method):
    """Return the weight, in float64, that the factorised ``stack`` applies."""
    weights = [layer.weight.detach().to(torch.float64) for layer in stack]
    if method == "lowrank":
        right, left = (weight.reshape(weight.shape[0], -1) for weight in weights)
        return left @ right
    if method == "tucker2":
        project, core, expand = weights
        return torch.einsum("ta,abij,bs->tsij", expand[:, :, 0, 0], core, project[:, :, 0, 0])

    # CP: a 1x1 projection, one or two depthwise convs whose kernels multiply, a 1x1 expansion
    project, *depthwise, expand = weights
    kernel = torch.ones(project.shape[0], 1, 1, dtype=torch.float64)
    for weight in depthwise:
        kernel = kernel * weight[:, 0]
    return torch.einsum("tr,rij,rs->tsij", expand[:, :, 0, 0], kernel, project[:, :, 0, 0])


def relative_metric_error(weight, approximation, second_moment):
    """Return sqrt(tr(E S E^T) / tr(W S W^T)) with E = W - approximation."""
    weight = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    residual = weight - approximation.to(torch.float64).reshape(weight.shape)
    error = torch.trace(residual @ second_moment @ residual.T)
    reference = torch.trace(weight @ second_moment @ weight.T)
    return math.sqrt(float(error / reference))


def weight_count(module):
    """Return the number of weights of a layer or stack, biases left out."""
    return sum(parameter.numel() for name, parameter in module.named_parameters() if not name.endswith("bias"))


def small_cnn(seed=0):
    """Return a random CNN with a 3x3 conv, a 5x3 conv, a 1x1 conv and a Linear layer."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        relu1=nn.ReLU(),
        body=nn.Conv2d(16, 32, (5, 3), padding=(2, 1)),
        relu2=nn.ReLU(),
        mix=nn.Conv2d(32, 24, 1),
        pool=nn.AdaptiveAvgPool2d(2),
        flatten=nn.Flatten(),
        head=nn.Linear(96, 10),
    )).eval()


@pytest.fixture(scope="module")
def digits_model():
    return train_digits_cnn(random_state=0)


@pytest.fixture(scope="module")
def digits_split():
    return load_digits_split(random_state=0)


@pytest.fixture(scope="module")
def digits_statistics(digits_model, digits_split):
    images, _ = digits_split.calibration
    return collect_input_statistics(digits_model, images, progress=False)


@pytest.fixture(scope="module")
def compressed_digits(digits_model, digits_statistics):
    compressed, _ = compress(digits_model, digits_statistics, param_ratio=0.5, progress=False)
    return compressed


# Full-rank equivalence

@pytest.mark.parametrize("norm", ["sigma", "frobenius"])
@pytest.mark.parametrize("make_layer, input_shape, output_shape, n_calibration", [case[1:] for case in FULL_RANK_CASES],
                         ids=FULL_RANK_IDS)
def test_full_rank_reproduces_layer(make_layer, input_shape, output_shape, n_calibration, norm):
    torch.manual_seed(0)
    layer = make_layer().eval()
    inputs = random_input(input_shape)
    out_channels, in_channels = layer.weight.shape[:2]
    is_matrix = isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1)
    method = "lowrank" if is_matrix else "tucker2"
    rank = min(out_channels, in_channels) if is_matrix else (out_channels, in_channels)
    metric = None
    if norm == "sigma":
        calibration = random_input((n_calibration,) + input_shape[1:], seed=2)
        metric = collect_input_statistics(nn.Sequential(layer), calibration, progress=False)["0"].second_moment

    replacement, _, _ = factorise_layer(layer, method, rank, metric)

    with torch.no_grad():
        expected, got = layer(inputs), replacement(inputs)
    assert got.shape == output_shape
    assert torch.allclose(got, expected, rtol=0, atol=OUTPUT_ATOL)


@pytest.mark.parametrize("make_layer", [case[1] for case in FULL_RANK_CASES], ids=FULL_RANK_IDS)
def test_full_rank_last_layer_bias(make_layer):
    torch.manual_seed(0)
    layer = make_layer()
    out_channels, in_channels = layer.weight.shape[:2]
    is_matrix = isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1)
    method = "lowrank" if is_matrix else "tucker2"
    rank = min(out_channels, in_channels) if is_matrix else (out_channels, in_channels)

    replacement, _, _ = factorise_layer(layer, method, rank)

    *first_layers, last_layer = list(replacement)
    assert all(stacked.bias is None for stacked in first_layers)
    if layer.bias is None:
        assert last_layer.bias is None
    else:
        assert torch.equal(last_layer.bias, layer.bias)


def test_stride_only_on_spatial_layers():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 64, 11, stride=4, padding=2)
    inputs = random_input((1, 3, 224, 224))

    for method, rank in [("tucker2", (16, 3)), ("cp4", 16), ("cp3", 16)]:
        replacement, _, _ = factorise_layer(layer, method, rank, options={"n_iter_max": 5})
        with torch.no_grad():
            assert replacement(inputs).shape == (1, 64, 55, 55), method
        pointwise = [conv for conv in replacement if tuple(conv.kernel_size) == (1, 1)]
        spatial = [conv for conv in replacement if tuple(conv.kernel_size) != (1, 1)]
        assert len(pointwise) == 2, method
        for conv in pointwise:
            assert tuple(conv.stride) == (1, 1), method
            assert tuple(conv.padding) == (0, 0), method
        strides = np.prod([conv.stride for conv in spatial], axis=0)
        assert tuple(strides) == (4, 4), method


def test_asymmetric_cp_output_shape():
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 16, (3, 5), padding=(1, 2), stride=(2, 1))
    inputs = random_input((1, 16, 11, 13))

    for method in ["cp4", "cp3"]:
        replacement, _, _ = factorise_layer(layer, method, 8, options={"n_iter_max": 5})
        with torch.no_grad():
            assert replacement(inputs).shape == layer(inputs).shape, method


def test_exact_low_rank_model_reproduced():
    # A ReLU after every layer keeps the inputs of the next layer from lying in the low-rank
    # output space of this one, so that every Sigma is positive definite.
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        wide=nn.Conv2d(3, 64, 11, stride=4, padding=2),
        relu1=nn.ReLU(),
        even=nn.Conv2d(64, 32, 4, padding="same"),
        relu2=nn.ReLU(),
        depthwise=nn.Conv2d(32, 32, 3, padding="same", groups=32),
        relu3=nn.ReLU(),
        dilated=nn.Conv2d(32, 32, 3, dilation=2, padding=2),
        relu4=nn.ReLU(),
        no_bias=nn.Conv2d(32, 32, 3, bias=False),
        norm=nn.BatchNorm2d(32),
        relu5=nn.ReLU(),
        asymmetric=nn.Conv2d(32, 32, (3, 5), padding=(1, 2), stride=(2, 1)),
        relu6=nn.ReLU(),
        pointwise=nn.Conv2d(32, 48, 1),
        relu7=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(48, 40),
    )).eval()
    ranks = {"wide": (8, 3), "even": (6, 5), "dilated": (5, 6), "no_bias": (4, 4), "asymmetric": (6, 6),
             "pointwise": 5, "head": 4}
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if isinstance(rank, tuple):
            set_low_multilinear_rank(layer, rank)
        else:
            set_low_rank(layer, rank)
    inputs = random_input((64, 3, 64, 64))

    compressed, report = compress(model, inputs, ranks=ranks, layers="all", progress=False)

    assert sorted(row.name for row in report.compressed) == sorted(ranks)
    for name in list(ranks) + ["depthwise"]:
        expected = layer_output(model, name, inputs)
        got = layer_output(compressed, name, inputs)
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, rtol=0, atol=OUTPUT_ATOL), name


def test_depthwise_layer_unchanged_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(32, 64, 4, padding="same"),
        depthwise=nn.Conv2d(64, 64, 3, padding="same", groups=64),
    ))
    inputs = random_input((8, 32, 9, 10))

    compressed, report = compress(model, inputs, progress=False)

    assert isinstance(compressed.depthwise, nn.Conv2d)
    assert torch.equal(compressed.depthwise.weight, model.depthwise.weight)
    row = next(row for row in report.layers if row.name == "depthwise")
    assert not row.compressed
    assert "groups=64" in row.reason
    assert isinstance(compressed.conv, nn.Sequential)
    with torch.no_grad():
        assert compressed(inputs).shape == model(inputs).shape


def test_batchnorm_conv_keeps_no_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3)).eval()
    inputs = random_input((16, 16, 10, 10))

    compressed, report = compress(model, inputs, progress=False)

    assert [row.compressed for row in report.compressed] == [True, True]
    assert compressed[0][-1].bias is None
    assert torch.equal(compressed[2][-1].bias, model[2].bias)


def test_pointwise_layers_without_depthwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(192, 160, 1), nn.ReLU(), nn.Flatten(), nn.Linear(160 * 4 * 4, 30)).eval()
    inputs = random_input((16, 192, 4, 4))

    compressed, report = compress(model, inputs, layers="all", progress=False)

    assert [row.name for row in report.compressed] == ["0", "3"]
    assert [row.method for row in report.compressed] == ["lowrank", "lowrank"]
    convs = list(compressed[0])
    assert len(convs) == 2
    for conv in convs:
        assert isinstance(conv, nn.Conv2d)
        assert tuple(conv.kernel_size) == (1, 1)
        assert conv.groups == 1
    assert [type(layer) for layer in compressed[3]] == [nn.Linear, nn.Linear]


# Metric error

@pytest.mark.parametrize("method", ["tucker2", "cp4", "cp3"])
def test_report_metric_error_matches_recomposition(method):
    model = small_cnn()
    inputs = random_input((32, 3, 8, 8))
    statistics = collect_input_statistics(model, inputs, progress=False)

    compressed, report = compress(model, statistics, method=method, layers="all", progress=False,
                                  decomposition_options={"n_iter_max": 20})

    assert len(report.compressed) == 4
    for row in report.compressed:
        original = model.get_submodule(row.name)
        approximation = recompose_weight(compressed.get_submodule(row.name), row.method)
        expected = relative_metric_error(original.weight, approximation, statistics[row.name].second_moment)
        assert row.metric_error == pytest.approx(expected, rel=ERROR_RTOL), row.name


def test_sigma_fit_not_worse_than_frobenius():
    model = small_cnn()
    inputs = random_input((32, 3, 8, 8))
    statistics = collect_input_statistics(model, inputs, progress=False)

    _, sigma_report = compress(model, statistics, norm="sigma", layers="all", progress=False)
    _, frobenius_report = compress(model, statistics, norm="frobenius", layers="all", progress=False)

    assert len(sigma_report.compressed) == 4
    for sigma_row, frobenius_row in zip(sigma_report.compressed, frobenius_report.compressed):
        assert sigma_row.rank == frobenius_row.rank
        # Tucker-2 alternates exact block minimisations from an SVD start, so it ends at or
        # below the Frobenius fit's metric error. The 1e-9 margin absorbs rounding.
        assert sigma_row.metric_error <= frobenius_row.metric_error + 1e-9, sigma_row.name


@pytest.mark.parametrize("n_samples", [200, 12], ids=["full-rank-metric", "singular-metric"])
def test_low_rank_factors_match_svd_optimum(n_samples):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((12, 20))
    samples = rng.standard_normal((n_samples, 20)) * np.linspace(0.1, 3.0, 20)
    second_moment = samples.T @ samples / n_samples
    rank = 4

    left, right = low_rank_factors(torch.from_numpy(matrix), rank, torch.from_numpy(second_moment))

    # By the Eckart-Young theorem the best rank-4 approximation of W L, with L = Sigma^{1/2},
    # leaves the tail singular values of W L, and ||(W - W~) L||_F^2 = tr(E Sigma E^T).
    root = np.real(scipy.linalg.sqrtm(second_moment))
    singular_values = np.linalg.svd(matrix @ root, compute_uv=False)
    optimum = np.sum(singular_values[rank:] ** 2)
    residual = matrix - (left @ right).numpy()
    error = np.trace(residual @ second_moment @ residual.T)
    assert left.shape == (12, rank)
    assert right.shape == (rank, 20)
    assert error == pytest.approx(optimum, rel=1e-8, abs=1e-10)


def test_low_rank_factors_frobenius_svd():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((10, 15))

    left, right = low_rank_factors(torch.from_numpy(matrix), 3)

    u, s, vt = np.linalg.svd(matrix)
    expected = u[:, :3] * s[:3] @ vt[:3]
    assert np.allclose((left @ right).numpy(), expected, atol=1e-10)


# Rank selection

WEIGHT_SHAPES = st.tuples(
    st.integers(1, 64), st.integers(1, 64), st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 5), (3, 5)])
).map(lambda shape: (shape[0], shape[1]) + shape[2])


def budget_and_floor(method, weight_shape, param_ratio):
    floor_rank = (1, 1) if method == "tucker2" else 1
    return param_ratio * math.prod(weight_shape), factorised_parameters(method, weight_shape, floor_rank)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["tucker2", "cp4", "cp3", "lowrank"]), weight_shape=WEIGHT_SHAPES,
       param_ratio=st.floats(0.001, 1.0))
def test_ranks_for_ratio_within_budget(method, weight_shape, param_ratio):
    if method == "lowrank":
        weight_shape = weight_shape[:2]
    budget, floor_cost = budget_and_floor(method, weight_shape, param_ratio)

    rank = ranks_for_ratio(method, weight_shape, param_ratio)

    ranks = rank if isinstance(rank, tuple) else (rank,)
    assert all(r >= 1 for r in ranks)
    if floor_cost <= budget:
        # Some rank fits the budget, so the chosen one must.
        assert factorised_parameters(method, weight_shape, rank) <= budget
    else:
        assert all(r == 1 for r in ranks)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["tucker2", "cp4", "cp3", "lowrank"]), weight_shape=WEIGHT_SHAPES,
       param_ratio=st.floats(0.001, 1.0))
def test_ranks_for_ratio_maximal(method, weight_shape, param_ratio):
    if method == "lowrank":
        weight_shape = weight_shape[:2]
    budget, _ = budget_and_floor(method, weight_shape, param_ratio)

    rank = ranks_for_ratio(method, weight_shape, param_ratio)

    if method == "tucker2":
        for mode in range(2):
            if rank[mode] < weight_shape[mode]:
                larger = list(rank)
                larger[mode] += 1
                assert factorised_parameters(method, weight_shape, tuple(larger)) > budget, mode
    else:
        assert factorised_parameters(method, weight_shape, rank + 1) > budget


def test_ranks_for_ratio_single_output_channel():
    # At ratio 0.5 the budget of a (1, 64, 3, 3) weight is 288. Rank (1, 3) costs 220 and (1, 4) costs 293.
    assert ranks_for_ratio("tucker2", (1, 64, 3, 3), 0.5) == (1, 3)


def test_half_ratio_halves_every_layer(digits_model, digits_statistics):
    compressed, report = compress(digits_model, digits_statistics, param_ratio=0.5, progress=False)

    assert [row.name for row in report.compressed] == ["conv1", "conv2", "conv3"]
    for row in report.compressed:
        original = digits_model.get_submodule(row.name)
        assert weight_count(compressed.get_submodule(row.name)) <= 0.5 * original.weight.numel(), row.name


def test_half_ratio_random_model():
    model = small_cnn()
    inputs = random_input((16, 3, 8, 8))

    compressed, report = compress(model, inputs, param_ratio=0.5, layers="all", progress=False)

    assert len(report.compressed) == 4
    for row in report.compressed:
        original = model.get_submodule(row.name)
        replacement = compressed.get_submodule(row.name)
        assert weight_count(replacement) <= 0.5 * original.weight.numel(), row.name
        assert row.params_after == sum(parameter.numel() for parameter in replacement.parameters())


def test_explicit_ranks_honoured():
    model = small_cnn()
    inputs = random_input((16, 3, 8, 8))
    ranks = {"stem": (5, 2), "body": (7, 3), "mix": 6, "head": 2}

    compressed, report = compress(model, inputs, ranks=ranks, layers="all", progress=False)

    assert {row.name: row.rank for row in report.compressed} == ranks
    project, core, expand = compressed.body
    assert tuple(core.weight.shape) == (7, 3, 5, 3)
    assert tuple(project.weight.shape) == (3, 16, 1, 1)
    assert tuple(expand.weight.shape) == (32, 7, 1, 1)
    assert compressed.mix[0].out_channels == 6
    assert compressed.head[0].out_features == 2


def test_ranks_for_some_layers_only():
    model = small_cnn()
    inputs = random_input((16, 3, 8, 8))

    compressed, report = compress(model, inputs, ranks={"body": (7, 3)}, progress=False)

    rows = {row.name: row for row in report.layers}
    assert rows["body"].compressed
    assert rows["body"].rank == (7, 3)


@pytest.mark.parametrize("layer, rank", [
    ("body", (0, 3)),
    ("body", (3, -1)),
    ("body", 4),
    ("body", (4,)),
    ("body", (2.5, 3)),
    ("body", (True, 3)),
    ("mix", 0),
    ("mix", (2, 2)),
    ("mix", True),
    ("head", -3),
])
def test_bad_rank_raises(layer, rank):
    model = small_cnn()
    inputs = random_input((4, 3, 8, 8))

    with pytest.raises(ValueError, match=layer):
        compress(model, inputs, ranks={layer: rank}, param_ratio=0.5, layers="all", progress=False)


@pytest.mark.parametrize("method", ["cp4", "cp3"])
def test_bad_cp_rank_raises(method):
    model = small_cnn()
    inputs = random_input((4, 3, 8, 8))

    with pytest.raises(ValueError, match="body"):
        compress(model, inputs, method=method, ranks={"body": (4, 4)}, param_ratio=0.5, progress=False)


def test_ranks_not_a_mapping_raises():
    with pytest.raises(TypeError, match="mapping"):
        compress(small_cnn(), random_input((4, 3, 8, 8)), ranks=[(4, 4)], progress=False)


@pytest.mark.parametrize("argument", ["layers", "exclude", "ranks"])
def test_unknown_layer_names_raise(argument):
    model = small_cnn()
    inputs = random_input((4, 3, 8, 8))
    value = {"ranks": {"not_a_layer": (2, 2)}, "layers": ["body", "not_a_layer"], "exclude": ["not_a_layer"]}[argument]

    with pytest.raises(ValueError, match="not_a_layer"):
        compress(model, inputs, progress=False, **{argument: value})


@pytest.mark.parametrize("argument, value, choices", [
    ("method", "tucker3", ["tucker2", "cp4", "cp3"]),
    ("norm", "l2", ["sigma", "frobenius"]),
    ("calibration", "two-shot", ["one-shot", "sequential"]),
])
def test_bad_option_lists_choices(argument, value, choices):
    with pytest.raises(ValueError) as error:
        compress(small_cnn(), random_input((4, 3, 8, 8)), progress=False, **{argument: value})

    message = str(error.value)
    assert value in message
    for choice in choices:
        assert choice in message


@pytest.mark.parametrize("param_ratio", [0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_param_ratio_raises(param_ratio):
    with pytest.raises(ValueError, match="param_ratio"):
        compress(small_cnn(), random_input((4, 3, 8, 8)), param_ratio=param_ratio, progress=False)


def test_param_ratio_one_accepted():
    _, report = compress(small_cnn(), random_input((4, 3, 8, 8)), param_ratio=1, progress=False)

    assert len(report.layers) >= 2


@pytest.mark.parametrize("rank_rule", [{"param_ratio": 0.5}, {"param_ratio": 1e-6}, {"budget": 0.5}],
                         ids=["ratio", "tiny-ratio", "budget"])
def test_tiny_weights_finite(rank_rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(1e-8 * torch.randn(32, 32, 3, 3))
    inputs = random_input((8, 32, 6, 6))

    compressed, report = compress(model, inputs, progress=False, **rank_rule)

    row = report.layers[0]
    assert row.compressed
    assert min(row.rank) >= 1
    if rank_rule.get("param_ratio") == 1e-6:
        assert row.rank == (1, 1)
    assert math.isfinite(row.metric_error)
    assert math.isfinite(row.frobenius_error)
    with torch.no_grad():
        assert torch.isfinite(compressed(inputs)).all()


# Input model, in-place mode and statistics

def batchnorm_cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1, bias=False),
        norm=nn.BatchNorm2d(16),
        relu=nn.ReLU(),
        body=nn.Conv2d(16, 16, 3, padding=1),
    ))
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model


def test_input_model_unchanged():
    model = batchnorm_cnn()
    state = copy.deepcopy(model.state_dict())
    types = [(name, type(module)) for name, module in model.named_modules()]

    compressed, _ = compress(model, random_input((8, 3, 8, 8)), progress=False)

    assert compressed is not model
    assert [(name, type(module)) for name, module in model.named_modules()] == types
    assert model.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_input_model_modes_unchanged():
    model = batchnorm_cnn()
    # Training with frozen BatchNorm: a mix of train and eval modes.
    model.train()
    model.norm.eval()
    modes = [(name, module.training) for name, module in model.named_modules()]

    compress(model, random_input((8, 3, 8, 8)), progress=False)

    assert [(name, module.training) for name, module in model.named_modules()] == modes


def test_inplace_modifies_model():
    model = batchnorm_cnn().eval()

    compressed, report = compress(model, random_input((8, 3, 8, 8)), inplace=True, progress=False)

    assert compressed is model
    assert isinstance(model.stem, nn.Sequential)
    assert isinstance(model.body, nn.Sequential)
    assert [row.name for row in report.compressed] == ["stem", "body"]


def test_statistics_mapping_same_as_data():
    model = batchnorm_cnn().eval()
    inputs = random_input((16, 3, 8, 8))
    statistics = collect_input_statistics(model, inputs, progress=False)
    moments = {name: (stats.second_moment.clone(), stats.mean.clone(), stats.count) for name, stats in statistics.items()}

    from_data, data_report = compress(model, inputs, progress=False)
    from_statistics, statistics_report = compress(model, statistics, progress=False)

    for data_row, statistics_row in zip(data_report.layers, statistics_report.layers):
        assert data_row.rank == statistics_row.rank
        assert data_row.metric_error == pytest.approx(statistics_row.metric_error, rel=1e-9)
    with torch.no_grad():
        assert torch.allclose(from_data(inputs), from_statistics(inputs), rtol=0, atol=1e-6)
    for name, (second_moment, mean, count) in moments.items():
        assert torch.equal(statistics[name].second_moment, second_moment), name
        assert torch.equal(statistics[name].mean, mean), name
        assert statistics[name].count == count, name


def test_statistics_mapping_missing_layer_raises():
    model = batchnorm_cnn().eval()
    statistics = collect_input_statistics(model, random_input((8, 3, 8, 8)), layers=["stem"], progress=False)

    with pytest.raises(ValueError, match="body"):
        compress(model, statistics, progress=False)


def test_fewer_patches_than_features():
    # 2 images give 2 * 8 * 8 = 128 patches for D = 16 * 3 * 3 = 144 features, so Sigma is
    # singular, and its float32 accumulation leaves eigenvalues slightly below zero.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, bias=False)).eval()
    inputs = random_input((2, 16, 10, 10))

    compressed, report = compress(model, inputs, progress=False)

    row = report.layers[0]
    assert row.compressed
    assert math.isfinite(row.metric_error)
    with torch.no_grad():
        assert torch.isfinite(compressed(inputs)).all()


def test_sigma_without_data_raises():
    with pytest.raises(ValueError, match="data"):
        compress(batchnorm_cnn(), None, norm="sigma", progress=False)


# Grouped, transposed and dead-channel layers

def test_grouped_convs_skipped_with_reasons():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 32, 3, padding=1),
        depthwise=nn.Conv2d(32, 32, 3, padding=1, groups=32),
        grouped=nn.Conv2d(32, 32, 3, padding=1, groups=4),
        body=nn.Conv2d(32, 32, 3, padding=1),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(32, 10),
    )).eval()
    inputs = random_input((8, 3, 8, 8))

    for layers in [None, "all"]:
        compressed, report = compress(model, inputs, layers=layers, progress=False)

        rows = {row.name: row for row in report.layers}
        assert not rows["depthwise"].compressed
        assert "groups=32" in rows["depthwise"].reason
        assert not rows["grouped"].compressed
        assert "groups=4" in rows["grouped"].reason
        assert rows["stem"].compressed
        assert rows["body"].compressed
        assert torch.equal(compressed.grouped.weight, model.grouped.weight)
        with torch.no_grad():
            assert torch.isfinite(compressed(inputs)).all()


def test_grouped_conv_named_is_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3, groups=4))

    _, report = compress(model, random_input((4, 3, 8, 8)), layers=["1"], progress=False)

    assert not report.layers[0].compressed
    assert "groups=4" in report.layers[0].reason


def test_transposed_conv_skipped_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        up=nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1),
        body=nn.Conv2d(32, 8, 3, padding=1),
    )).eval()
    inputs = random_input((4, 3, 8, 8))

    for layers in [None, "all", ["up", "body"]]:
        compressed, report = compress(model, inputs, layers=layers, progress=False)

        rows = {row.name: row for row in report.layers}
        assert not rows["up"].compressed
        assert "ConvTranspose2d" in rows["up"].reason
        assert compressed.up is not model.up
        assert torch.equal(compressed.up.weight, model.up.weight)
        assert rows["body"].compressed
        with torch.no_grad():
            assert compressed(inputs).shape == (4, 8, 16, 16)


def dead_channel_model(kernel_size, seed=0):
    """Return a conv, ReLU, conv model whose ReLU output channels 0 to 7 are always zero."""
    torch.manual_seed(seed)
    first = nn.Conv2d(3, 32, 3, padding=1)
    with torch.no_grad():
        first.weight[:8] = 0
        first.bias[:8] = -1
    return nn.Sequential(first, nn.ReLU(), nn.Conv2d(32, 32, kernel_size, padding=kernel_size // 2)).eval()


@pytest.mark.parametrize("kernel_size, rank", [(3, (8, 8)), (1, 6)], ids=["tucker2", "lowrank"])
def test_dead_channels_finite(kernel_size, rank):
    model = dead_channel_model(kernel_size)
    inputs = random_input((32, 3, 8, 8))
    statistics = collect_input_statistics(model, inputs, layers=["2"], progress=False)
    assert torch.all(statistics["2"].mean.reshape(32, -1)[:8] == 0)

    compressed, report = compress(model, statistics, ranks={"2": rank}, layers=["2"], progress=False)

    row = report.layers[-1]
    assert row.compressed
    assert math.isfinite(row.metric_error)
    with torch.no_grad():
        assert torch.isfinite(compressed(inputs)).all()


@pytest.mark.parametrize("kernel_size, rank, rtol", [(3, (8, 8), 1e-4), (1, 6, 1e-10)], ids=["tucker2", "lowrank"])
def test_dead_channel_weights_leave_metric_error(kernel_size, rank, rtol):
    model = dead_channel_model(kernel_size)
    inputs = random_input((32, 3, 8, 8))
    statistics = collect_input_statistics(model, inputs, layers=["2"], progress=False)
    changed = copy.deepcopy(model)
    weight = changed[2].weight
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        weight[:, :8] = 10 * weight.abs().max() * torch.randn(weight[:, :8].shape, generator=generator)

    _, report = compress(model, statistics, ranks={"2": rank}, layers=["2"], progress=False)
    _, changed_report = compress(changed, statistics, ranks={"2": rank}, layers=["2"], progress=False)

    # The closed form depends on W only through W Sigma, so the low-rank error is unchanged up
    # to rounding. The Tucker-2 fit adds a ridge of 1e-6 times the mean eigenvalue to Sigma, which
    # gives the dead-channel weights a small influence.
    assert changed_report.layers[-1].metric_error == pytest.approx(report.layers[-1].metric_error, rel=rtol)


def test_zero_calibration_frobenius_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    zeros = torch.zeros(4, 3, 8, 8)

    with pytest.warns(UserWarning, match="all zero"):
        compressed, report = compress(model, zeros, progress=False)

    assert [row.name for row in report.compressed] == ["0", "2"]
    for row in report.compressed:
        assert "Frobenius" in row.reason, row.name
        assert math.isfinite(row.metric_error), row.name
        assert math.isfinite(row.frobenius_error), row.name
    with torch.no_grad():
        assert torch.isfinite(compressed(random_input((2, 3, 8, 8)))).all()


# Parameters and MACs

def mac_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        strided=nn.Conv2d(8, 8, 3, stride=3, padding=1),
        body=nn.Conv2d(8, 8, 3, padding=1),
    )).eval()


# Hand counts for a 1x8x9x9 input, which "strided" maps to 3x3 and "body" keeps at 3x3.
# Each original layer has 576 weights, 8 biases and 3 * 3 * 8 * 8 * 9 = 5184 MACs.
# "strided" at rank (2, 8) has 8*8 + 8*2*9 + 2*8 = 224 weights and 81*8*8 + 9*8*2*9 + 9*2*8 = 6624 MACs.
# "body" at rank (2, 2) has 8*2 + 2*2*9 + 2*8 = 68 weights and 9*8*2 + 9*2*2*9 + 9*2*8 = 612 MACs.
MAC_RANKS = {"strided": (2, 8), "body": (2, 2)}


def test_report_counts_match_hand_counts():
    _, report = compress(mac_model(), random_input((16, 8, 9, 9)), ranks=MAC_RANKS, progress=False)

    rows = {row.name: row for row in report.layers}
    assert (rows["strided"].params_before, rows["strided"].params_after) == (584, 232)
    assert (rows["strided"].macs_before, rows["strided"].macs_after) == (5184, 6624)
    assert (rows["body"].params_before, rows["body"].params_after) == (584, 76)
    assert (rows["body"].macs_before, rows["body"].macs_after) == (5184, 612)


def test_require_fewer_macs_skips_layer():
    model = mac_model()

    compressed, report = compress(model, random_input((16, 8, 9, 9)), ranks=MAC_RANKS, require_fewer_macs=True,
                                  progress=False)

    rows = {row.name: row for row in report.layers}
    assert not rows["strided"].compressed
    assert "6624" in rows["strided"].reason
    assert isinstance(compressed.strided, nn.Conv2d)
    assert torch.equal(compressed.strided.weight, model.strided.weight)
    assert rows["body"].compressed
    assert rows["body"].macs_after == 612


def test_input_size_gives_macs_with_statistics():
    model = mac_model()
    statistics = collect_input_statistics(model, random_input((16, 8, 9, 9)), progress=False)

    _, report = compress(model, statistics, ranks=MAC_RANKS, input_size=(8, 9, 9), progress=False)

    rows = {row.name: row for row in report.layers}
    assert rows["body"].macs_before == 5184
    assert rows["body"].macs_after == 612


def test_input_size_of_wrong_shape_named():
    model = mac_model()
    statistics = collect_input_statistics(model, random_input((16, 8, 9, 9)), progress=False)

    with pytest.raises(ValueError, match=r"input_size \(3, 9, 9\) does not fit the model"):
        compress(model, statistics, ranks=MAC_RANKS, input_size=(3, 9, 9), progress=False)


def test_fewer_macs_needs_input_size():
    model = mac_model()
    statistics = collect_input_statistics(model, random_input((16, 8, 9, 9)), progress=False)

    # Statistics carry no spatial size, so the MACs are unknown. The option must then either
    # raise a ValueError that names input_size or still keep the layer whose MACs would grow.
    try:
        _, report = compress(model, statistics, ranks=MAC_RANKS, require_fewer_macs=True, progress=False)
    except ValueError as error:
        assert "input_size" in str(error)
    else:
        rows = {row.name: row for row in report.layers}
        assert not rows["strided"].compressed


# Whole-model error on held-out data

def test_sigma_beats_frobenius_held_out(digits_model, digits_split, digits_statistics):
    test_images, _ = digits_split.test
    reference = layer_output(digits_model, "conv3", test_images)

    relative_errors = {}
    for norm in ["sigma", "frobenius"]:
        compressed, report = compress(digits_model, digits_statistics, norm=norm, param_ratio=0.5, progress=False)
        assert [row.name for row in report.compressed] == ["conv1", "conv2", "conv3"]
        output = layer_output(compressed, "conv3", test_images)
        relative_errors[norm] = float(torch.linalg.norm(output - reference) / torch.linalg.norm(reference))

    assert relative_errors["sigma"] <= relative_errors["frobenius"]


@pytest.mark.parametrize("method", ["cp4", "cp3"])
def test_cp_compresses_digits(method, digits_model, digits_split, digits_statistics):
    test_images, _ = digits_split.test

    compressed, report = compress(digits_model, digits_statistics, method=method, param_ratio=0.5, progress=False,
                                  decomposition_options={"n_iter_max": 30})

    assert [row.name for row in report.compressed] == ["conv1", "conv2", "conv3"]
    for row in report.compressed:
        original = digits_model.get_submodule(row.name)
        assert row.method == method
        assert weight_count(compressed.get_submodule(row.name)) <= 0.5 * original.weight.numel(), row.name
        assert 0 <= row.metric_error < 1, row.name
    with torch.no_grad():
        assert torch.isfinite(compressed(test_images)).all()


# Report

def report_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        relu=nn.ReLU(),
        depthwise=nn.Conv2d(16, 16, 3, padding=1, groups=16),
        body=nn.Conv2d(16, 32, 3, padding=1),
        mix=nn.Conv2d(32, 32, 1),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(32, 10),
    )).eval()


def test_report_table_names_every_layer():
    _, report = compress(report_model(), random_input((8, 3, 8, 8)), exclude=["body"], progress=False)
    text = str(report)

    compressed = {row.name for row in report.compressed}
    skipped = {row.name for row in report.skipped}
    assert compressed == {"stem"}
    assert skipped == {"depthwise", "body", "mix", "head"}
    table_lines = text.splitlines()
    for row in report.compressed:
        assert any(line.startswith(row.name + " ") for line in table_lines), row.name
    for row in report.skipped:
        assert row.reason
        assert f"skipped {row.name} " in text
        assert row.reason in text


def test_report_totals_match_rows():
    _, report = compress(report_model(), random_input((8, 3, 8, 8)), layers="all", progress=False)

    rows = report.compressed
    totals = report.totals()
    assert len(rows) == 4
    assert totals["params_before"] == sum(row.params_before for row in rows)
    assert totals["params_after"] == sum(row.params_after for row in rows)
    assert totals["macs_before"] == sum(row.macs_before for row in rows)
    assert totals["macs_after"] == sum(row.macs_after for row in rows)


def test_report_dict_is_json():
    _, report = compress(report_model(), random_input((8, 3, 8, 8)), layers="all", progress=False)

    data = json.loads(json.dumps(report.to_dict()))

    assert [layer["name"] for layer in data["layers"]] == [row.name for row in report.layers]
    assert data["totals"] == report.totals()
    assert data["method"] == "tucker2"
    assert data["norm"] == "sigma"


# Export of a compressed model

def test_compressed_model_jit_script(compressed_digits, digits_split):
    images = digits_split.test[0][:16]

    scripted = torch.jit.script(compressed_digits)

    with torch.no_grad():
        assert torch.allclose(scripted(images), compressed_digits(images), atol=1e-5)


def test_compressed_model_jit_trace(compressed_digits, digits_split):
    images = digits_split.test[0][:16]

    with torch.no_grad():
        traced = torch.jit.trace(compressed_digits, images[:2])
        assert torch.allclose(traced(images), compressed_digits(images), atol=1e-5)


def test_compressed_model_export(compressed_digits, digits_split):
    images = digits_split.test[0][:16]

    exported = torch.export.export(compressed_digits, (images,))

    with torch.no_grad():
        assert torch.allclose(exported.module()(images), compressed_digits(images), atol=1e-5)


def test_compressed_model_compile(compressed_digits, digits_split):
    images = digits_split.test[0][:16]

    try:
        compiled = torch.compile(compressed_digits, backend="aot_eager")
        with torch.no_grad():
            output = compiled(images)
    except RuntimeError as error:
        if "not supported" in str(error) or "unavailable" in str(error):
            pytest.skip(f"torch.compile with backend='aot_eager' is unavailable here: {error}")
        raise

    with torch.no_grad():
        assert torch.allclose(output, compressed_digits(images), atol=1e-5)


def test_compressed_model_onnx(compressed_digits, digits_split, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed, so torch.onnx.export cannot be checked")
    images = digits_split.test[0][:2]

    torch.onnx.export(compressed_digits, (images,), tmp_path / "digits.onnx")

    assert (tmp_path / "digits.onnx").stat().st_size > 0


# Real data

@pytest.mark.data
def test_resnet20_sigma_beats_frobenius(data_dir):
    model = load_cifar_resnet(data_dir / "cifar10_resnets" / "resnet20-12fca82f.th")
    calibration_images, _ = load_cifar10(data_dir / "cifar10_calibration.npz", n=1000)
    test_images, test_labels = load_cifar10(data_dir / "cifar10_test.npz", n=2000)
    start = time.perf_counter()
    statistics = collect_input_statistics(model, calibration_images, progress=False)
    statistics_seconds = time.perf_counter() - start

    accuracies, seconds = {}, {}
    for norm in ["sigma", "frobenius"]:
        start = time.perf_counter()
        compressed, report = compress(model, statistics, param_ratio=0.5, exclude=["conv1"], norm=norm,
                                      progress=False, decomposition_options={"n_iter_max": 25})
        seconds[norm] = time.perf_counter() - start
        assert len(report.compressed) == 18
        accuracies[norm] = evaluate_accuracy(compressed, test_images, test_labels)

    print(f"\nResNet-20, Tucker-2 at param_ratio=0.5 on 2,000 test images: top-1 sigma "
          f"{accuracies['sigma']:.1%}, frobenius {accuracies['frobenius']:.1%}; seconds: statistics "
          f"{statistics_seconds:.1f}, sigma {seconds['sigma']:.1f}, frobenius {seconds['frobenius']:.1f}")
    assert accuracies["sigma"] >= accuracies["frobenius"] + 0.25
