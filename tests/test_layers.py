"""Tests of the layer builders and of the parameter and MAC counts."""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_datc.nn import (  # noqa: E402
    conv_macs,
    count_parameters,
    cp_conv,
    low_rank_conv1x1,
    low_rank_linear,
    tucker2_conv,
)

# float32 outputs of these layers are O(1), so 1e-4 leaves room for the rounding of a
# few hundred products in each of the three convolutions. float64 checks use 1e-10.
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}

# Convolutions that other decomposition tools have handled wrongly (large stride, even kernel with
# 'same', dilation, no bias, asymmetric geometry), each as (name, constructor arguments, input shape)
CONV_CASES = [
    ("stride-4-kernel-11", dict(in_channels=3, out_channels=64, kernel_size=11, stride=4, padding=2), (1, 3, 224, 224)),
    ("even-kernel-same", dict(in_channels=32, out_channels=64, kernel_size=4, padding="same"), (1, 32, 9, 10)),
    ("dilation-2", dict(in_channels=64, out_channels=64, kernel_size=3, dilation=2, padding=2), (1, 64, 12, 12)),
    ("no-bias", dict(in_channels=16, out_channels=32, kernel_size=3, bias=False), (2, 16, 10, 10)),
    ("asymmetric", dict(in_channels=16, out_channels=16, kernel_size=(3, 5), padding=(1, 2), stride=(2, 1)), (1, 16, 11, 13)),
    ("valid", dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding="valid", stride=(1, 2)), (1, 4, 7, 9)),
    (
        "mixed-geometry",
        dict(in_channels=5, out_channels=7, kernel_size=(3, 2), dilation=(1, 3), padding=(2, 1), stride=(3, 2)),
        (1, 5, 13, 11),
    ),
]
CASE_IDS = [case[0] for case in CONV_CASES]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def make_conv(arguments, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(**arguments, dtype=dtype)


def make_input(shape, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def random_orthogonal(size, generator):
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q


def full_rank_tucker2(weight, seed=2):
    """Return (core, [U_T, U_S]) with square orthogonal factors, so the weight is reproduced exactly."""
    generator = torch.Generator().manual_seed(seed)
    out_channels, in_channels = weight.shape[:2]
    output_factor = random_orthogonal(out_channels, generator)
    input_factor = random_orthogonal(in_channels, generator)
    core = torch.einsum("tsij,ta,sb->abij", weight.cpu().double(), output_factor, input_factor)
    return core, [output_factor, input_factor]


def random_cp(weight_shape, rank, layout, seed=3):
    """Return (weights, factors) of a random CP tensor whose entries have the scale of a default conv init."""
    generator = torch.Generator().manual_seed(seed)
    out_channels, in_channels, kernel_height, kernel_width = weight_shape
    if layout == "cp4":
        sizes = (out_channels, in_channels, kernel_height, kernel_width)
    else:
        sizes = (out_channels, in_channels, kernel_height * kernel_width)
    factors = [torch.randn(size, rank, generator=generator, dtype=torch.float64) for size in sizes]
    weights = torch.rand(rank, generator=generator, dtype=torch.float64) + 0.5

    # Scale the weights so that the outputs, like those of a default conv, are O(1)
    target_std = 1 / math.sqrt(in_channels * kernel_height * kernel_width)
    weights = weights * target_std / cp_weight(weights, factors, weight_shape).std()
    return weights, factors


def cp_weight(weights, factors, weight_shape):
    if len(factors) == 4:
        return torch.einsum("r,tr,sr,ir,jr->tsij", weights, *factors)
    return torch.einsum("r,tr,sr,kr->tsk", weights, *factors).reshape(weight_shape)


def conv_with_weight(arguments, weight, dtype=torch.float64, device="cpu", seed=0):
    conv = make_conv(arguments, dtype=dtype, seed=seed).to(device)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def max_difference(stack, conv, x):
    with torch.no_grad():
        expected = conv(x)
        output = stack(x)
    assert output.shape == expected.shape
    return (output - expected).abs().max().item()


def build(builder, conv, seed=4, rank=6):
    """Build a stack of the given kind for ``conv`` and return it with the conv that computes it exactly."""
    arguments = conv_arguments(conv)
    if builder == "tucker2":
        core, factors = full_rank_tucker2(conv.weight.detach())
        return tucker2_conv(conv, core, factors), conv
    if builder in ("cp4", "cp3"):
        weights, factors = random_cp(conv.weight.shape, rank, builder, seed=seed)
        weight = cp_weight(weights, factors, conv.weight.shape)
        reference = conv_with_weight(arguments, weight, conv.weight.dtype, conv.weight.device)
        return cp_conv(reference, weights, factors, layout=builder), reference
    raise AssertionError(builder)


def conv_arguments(conv):
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def is_conv1x1(layer):
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)


# Full-rank reproduction of the original output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, arguments, input_shape", CONV_CASES, ids=CASE_IDS)
def test_tucker2_full_rank_matches_conv(name, arguments, input_shape, dtype):
    conv = make_conv(arguments, dtype=dtype)
    stack, _ = build("tucker2", conv)
    x = make_input(input_shape, dtype)

    assert len(stack) == 3
    assert max_difference(stack, conv, x) < ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["cp4", "cp3"])
@pytest.mark.parametrize("name, arguments, input_shape", CONV_CASES, ids=CASE_IDS)
def test_cp_matches_conv_with_cp_weight(name, arguments, input_shape, layout, dtype):
    conv = make_conv(arguments, dtype=dtype)
    stack, reference = build(layout, conv, rank=16)
    x = make_input(input_shape, dtype)

    assert max_difference(stack, reference, x) < ATOL[dtype]


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "cp3"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize(
    "arguments",
    [
        dict(in_channels=6, out_channels=8, kernel_size=(3, 5), stride=(2, 1), dilation=(1, 2), padding=(1, 3)),
        dict(in_channels=6, out_channels=8, kernel_size=(4, 3), dilation=(1, 2), padding="same"),
        dict(in_channels=6, out_channels=8, kernel_size=(3, 2), padding=(0, 1)),
    ],
    ids=["strided", "even-same", "one-axis-padded"],
)
def test_padding_mode_matches_conv(builder, padding_mode, arguments):
    # Separate padding of the two axes in the 'cp4' stack must equal the joint 2-D padding
    conv = make_conv(dict(arguments, padding_mode=padding_mode))
    stack, reference = build(builder, conv)
    x = make_input((2, 6, 9, 10))

    spatial = [layer for layer in stack if not is_conv1x1(layer)]
    assert all(layer.padding_mode == padding_mode for layer in spatial)
    assert max_difference(stack, reference, x) < ATOL[torch.float64]


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "cp3"])
def test_stride_only_on_spatial_convs(builder):
    conv = make_conv(CONV_CASES[0][1], dtype=torch.float32)
    stack, reference = build(builder, conv, rank=16)
    x = make_input((1, 3, 224, 224), torch.float32)

    for layer in stack:
        if is_conv1x1(layer):
            assert tuple(layer.stride) == (1, 1)
            assert tuple(layer.padding) == (0, 0)
    spatial_strides = [tuple(layer.stride) for layer in stack if not is_conv1x1(layer)]
    if builder == "cp4":
        assert spatial_strides == [(4, 1), (1, 4)]
    else:
        assert spatial_strides == [(4, 4)]
    assert stack(x).shape == (1, 64, 55, 55)
    assert max_difference(stack, reference, x) < ATOL[torch.float32]


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "cp3"])
def test_stack_layer_structure(builder):
    conv = make_conv(dict(in_channels=16, out_channels=32, kernel_size=(3, 5), padding=(1, 2)))
    stack, _ = build(builder, conv, rank=6)

    kernel_sizes = [tuple(layer.kernel_size) for layer in stack]
    groups = [layer.groups for layer in stack]
    channels = [(layer.in_channels, layer.out_channels) for layer in stack]
    if builder == "tucker2":
        assert kernel_sizes == [(1, 1), (3, 5), (1, 1)]
        assert groups == [1, 1, 1]
        assert channels == [(16, 16), (16, 32), (32, 32)]
    elif builder == "cp4":
        assert kernel_sizes == [(1, 1), (3, 1), (1, 5), (1, 1)]
        assert groups == [1, 6, 6, 1]
        assert [tuple(layer.padding) for layer in stack] == [(0, 0), (1, 0), (0, 2), (0, 0)]
    else:
        assert kernel_sizes == [(1, 1), (3, 5), (1, 1)]
        assert groups == [1, 6, 1]


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "cp3", "conv1x1"])
@pytest.mark.parametrize("bias", [True, False])
def test_last_conv_bias_follows_original(builder, bias):
    if builder == "conv1x1":
        conv = make_conv(dict(in_channels=16, out_channels=32, kernel_size=1, bias=bias))
        stack = low_rank_conv1x1(conv, conv.weight[:, :, 0, 0], torch.eye(16))
    else:
        stack, conv = build(builder, make_conv(dict(in_channels=16, out_channels=32, kernel_size=3, bias=bias)))

    assert (stack[-1].bias is not None) == bias
    assert all(layer.bias is None for layer in stack[:-1])
    if bias:
        assert torch.equal(stack[-1].bias, conv.bias)


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "cp3", "conv1x1", "linear"])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_shift_added_to_output(builder, bias):
    generator = torch.Generator().manual_seed(5)
    shift = torch.randn(32, generator=generator, dtype=torch.float64)
    if builder == "linear":
        layer = nn.Linear(16, 32, bias=bias, dtype=torch.float64)
        stack = low_rank_linear(layer, layer.weight, torch.eye(16), bias_shift=shift.numpy())
        x = make_input((3, 16))
        expected_shift = shift
    elif builder == "conv1x1":
        layer = make_conv(dict(in_channels=16, out_channels=32, kernel_size=1, bias=bias))
        stack = low_rank_conv1x1(layer, layer.weight[:, :, 0, 0], torch.eye(16), bias_shift=shift)
        x = make_input((2, 16, 6, 6))
        expected_shift = shift[:, None, None]
    else:
        conv = make_conv(dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, bias=bias))
        _, layer = build(builder, conv)
        stack = _rebuild_with_shift(builder, layer, shift)
        x = make_input((2, 16, 6, 6))
        expected_shift = shift[:, None, None]

    assert stack[-1].bias is not None
    with torch.no_grad():
        difference = stack(x) - layer(x)
    torch.testing.assert_close(difference, expected_shift.expand_as(difference), atol=1e-10, rtol=0)


def _rebuild_with_shift(builder, conv, shift):
    if builder == "tucker2":
        core, factors = full_rank_tucker2(conv.weight.detach())
        return tucker2_conv(conv, core, factors, bias_shift=shift)
    weights, factors = random_cp(conv.weight.shape, 6, builder, seed=4)
    return cp_conv(conv, weights, factors, layout=builder, bias_shift=shift)


# Low-rank 1x1 convolutions and Linear layers


@pytest.mark.parametrize(
    "geometry",
    [
        dict(),
        dict(stride=2, padding=1),
        dict(stride=(1, 2), padding=(2, 0), dilation=3),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=2, padding_mode="circular"),
        dict(padding="same"),
    ],
    ids=["plain", "strided-padded", "asymmetric", "reflect", "circular", "same"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_rank_conv1x1_matches_product(geometry, dtype):
    generator = torch.Generator().manual_seed(6)
    left = torch.randn(160, 32, generator=generator, dtype=torch.float64) / math.sqrt(32)
    right = torch.randn(32, 192, generator=generator, dtype=torch.float64) / math.sqrt(192)
    conv = conv_with_weight(
        dict(in_channels=192, out_channels=160, kernel_size=1, **geometry), (left @ right)[:, :, None, None], dtype
    )
    stack = low_rank_conv1x1(conv, left, right)
    x = make_input((2, 192, 7, 8), dtype)

    assert len(stack) == 2
    assert all(layer.groups == 1 for layer in stack)
    assert tuple(stack[1].stride) == (1, 1)
    assert tuple(stack[1].padding) == (0, 0)
    assert max_difference(stack, conv, x) < ATOL[dtype]


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_matches_product(bias):
    generator = torch.Generator().manual_seed(7)
    left = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    right = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    linear = nn.Linear(12, 20, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(left @ right)
    stack = low_rank_linear(linear, left.numpy(), right.numpy())
    x = make_input((5, 12))

    assert [type(layer) for layer in stack] == [nn.Linear, nn.Linear]
    assert stack[0].bias is None
    assert (stack[1].bias is not None) == bias
    assert max_difference(stack, linear, x) < ATOL[torch.float64]


@pytest.mark.parametrize("layout", ["cp4", "cp3"])
def test_cp_1x1_kernel_gives_two_conv1x1(layout):
    # Depthwise 1x1 layers would only rescale channels, so none may appear
    conv = make_conv(dict(in_channels=192, out_channels=160, kernel_size=1, stride=2, padding=1), torch.float64)
    stack, reference = build(layout, conv, rank=8)
    x = make_input((1, 192, 9, 9))

    assert len(stack) == 2
    assert all(is_conv1x1(layer) and layer.groups == 1 for layer in stack)
    assert max_difference(stack, reference, x) < ATOL[torch.float64]


@pytest.mark.parametrize("kernel_size, padding, stride", [((1, 5), (1, 2), (2, 1)), ((3, 1), (1, 0), (1, 2))])
def test_cp4_unit_axis_gives_one_depthwise(kernel_size, padding, stride):
    arguments = dict(in_channels=8, out_channels=10, kernel_size=kernel_size, padding=padding, stride=stride)
    stack, reference = build("cp4", make_conv(arguments), rank=5)
    x = make_input((1, 8, 9, 11))

    assert [tuple(layer.kernel_size) for layer in stack] == [(1, 1), kernel_size, (1, 1)]
    assert stack[1].groups == 5
    assert max_difference(stack, reference, x) < ATOL[torch.float64]


def test_tucker2_low_rank_matches_reconstruction():
    generator = torch.Generator().manual_seed(8)
    output_factor = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    input_factor = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    core = torch.randn(3, 4, 3, 3, generator=generator, dtype=torch.float64) / 10
    weight = torch.einsum("abij,ta,sb->tsij", core, output_factor, input_factor)
    conv = conv_with_weight(dict(in_channels=10, out_channels=12, kernel_size=3, padding=1), weight)
    stack = tucker2_conv(conv, core, [output_factor, input_factor])

    assert [(layer.in_channels, layer.out_channels) for layer in stack] == [(10, 4), (4, 3), (3, 12)]
    assert max_difference(stack, conv, make_input((2, 10, 8, 8))) < ATOL[torch.float64]


def test_cp_accepts_cp_tensor():
    cp_tensor_module = pytest.importorskip("tensorly.cp_tensor")
    conv = make_conv(dict(in_channels=6, out_channels=8, kernel_size=3))
    weights, factors = random_cp(conv.weight.shape, 4, "cp4")
    reference = conv_with_weight(conv_arguments(conv), cp_weight(weights, factors, conv.weight.shape))
    stack = cp_conv(reference, *cp_tensor_module.CPTensor((weights, factors)))

    assert max_difference(stack, reference, make_input((1, 6, 7, 7))) < ATOL[torch.float64]


def test_tucker2_accepts_partial_tucker_output():
    tensorly_decomposition = pytest.importorskip("tensorly.decomposition")
    conv = make_conv(dict(in_channels=6, out_channels=8, kernel_size=3))
    weight = conv.weight.detach().numpy()
    (core, factors), _ = tensorly_decomposition.partial_tucker(weight, rank=[8, 6], modes=[0, 1])
    stack = tucker2_conv(conv, core, factors)

    assert max_difference(stack, conv, make_input((1, 6, 7, 7))) < 1e-8


# Dtype, device, training mode and conversion of the factors


def test_float64_carried():
    stack, _ = build("cp4", make_conv(dict(in_channels=4, out_channels=6, kernel_size=3), torch.float64))

    assert all(parameter.dtype == torch.float64 for parameter in stack.parameters())


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "cp3"])
def test_bfloat16_carried(builder):
    arguments = dict(in_channels=8, out_channels=12, kernel_size=3, padding=1)
    conv = make_conv(arguments, dtype=torch.float32)
    stack_float32, _ = build(builder, conv)
    stack, _ = build(builder, copy.deepcopy(conv).to(torch.bfloat16))
    x = make_input((1, 8, 6, 6), torch.float32)

    assert all(parameter.dtype == torch.bfloat16 for parameter in stack.parameters())
    with torch.no_grad():
        output = stack(x.to(torch.bfloat16))
        expected = stack_float32(x)
    assert output.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits, so each layer adds a relative rounding error near 4e-3
    assert (output.float() - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("builder", ["tucker2", "cp4", "conv1x1"])
def test_device_carried(builder, device):
    if builder == "conv1x1":
        conv = make_conv(dict(in_channels=8, out_channels=6, kernel_size=1), torch.float32).to(device)
        stack = low_rank_conv1x1(conv, conv.weight[:, :, 0, 0].cpu(), np.eye(8))
    else:
        conv = make_conv(dict(in_channels=8, out_channels=6, kernel_size=3), torch.float32).to(device)
        stack, conv = build(builder, conv)
    x = make_input((1, 8, 7, 7), torch.float32).to(device)

    assert all(parameter.device.type == device for parameter in stack.parameters())
    assert max_difference(stack, conv, x) < ATOL[torch.float32]


def test_numpy_and_float64_factors_converted():
    conv = make_conv(dict(in_channels=5, out_channels=7, kernel_size=3), torch.float32)
    core, factors = full_rank_tucker2(conv.weight.detach())
    from_numpy = tucker2_conv(conv, core.numpy(), [factor.numpy() for factor in factors])
    from_torch = tucker2_conv(conv, core, factors)
    x = make_input((1, 5, 6, 6), torch.float32)

    assert all(parameter.dtype == torch.float32 for parameter in from_numpy.parameters())
    assert max_difference(from_numpy, conv, x) < ATOL[torch.float32]
    assert max_difference(from_torch, conv, x) < ATOL[torch.float32]


def test_factors_copied_not_shared():
    conv = make_conv(dict(in_channels=5, out_channels=7, kernel_size=3))
    core, factors = full_rank_tucker2(conv.weight.detach())
    stack = tucker2_conv(conv, core, factors)
    before = [parameter.clone() for parameter in stack.parameters()]
    core.zero_()
    factors[0].zero_()

    assert all(torch.equal(old, new) for old, new in zip(before, stack.parameters()))


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_carried(training):
    conv = make_conv(dict(in_channels=4, out_channels=6, kernel_size=3)).train(training)
    weights, factors = random_cp(conv.weight.shape, 3, "cp4")
    stacks = [build("tucker2", conv)[0], cp_conv(conv, weights, factors)]

    for stack in stacks:
        assert stack.training == training
        assert all(layer.training == training for layer in stack)


# Export


def export_stacks():
    """Yield (name, stack, input) for one stack of each kind, in float32."""
    arguments = dict(in_channels=6, out_channels=8, kernel_size=(3, 4), padding="same", padding_mode="reflect")
    conv = make_conv(arguments, torch.float32)
    x = make_input((2, 6, 9, 10), torch.float32)
    for builder in ("tucker2", "cp4", "cp3"):
        yield builder, build(builder, conv)[0], x
    conv1x1 = make_conv(dict(in_channels=6, out_channels=8, kernel_size=1, stride=2, padding=1), torch.float32)
    yield "conv1x1", low_rank_conv1x1(conv1x1, conv1x1.weight[:, :, 0, 0], torch.eye(6)), x
    linear = nn.Linear(10, 8)
    yield "linear", low_rank_linear(linear, linear.weight, torch.eye(10)), make_input((3, 10), torch.float32)


EXPORT_CASES = list(export_stacks())
EXPORT_IDS = [case[0] for case in EXPORT_CASES]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("name, stack, x", EXPORT_CASES, ids=EXPORT_IDS)
def test_export_jit_script(name, stack, x):
    scripted = torch.jit.script(stack)

    assert max_difference(scripted, stack, x) == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("name, stack, x", EXPORT_CASES, ids=EXPORT_IDS)
def test_export_jit_trace(name, stack, x):
    traced = torch.jit.trace(stack, x)

    assert max_difference(traced, stack, x) == 0


@pytest.mark.parametrize("name, stack, x", EXPORT_CASES, ids=EXPORT_IDS)
def test_export_torch_export(name, stack, x):
    exported = torch.export.export(stack, (x,))

    assert max_difference(exported.module(), stack, x) < 1e-6


@pytest.mark.parametrize("name, stack, x", EXPORT_CASES[:2], ids=EXPORT_IDS[:2])
def test_torch_compile_graph_capture(name, stack, x):
    # The aot_eager backend captures the graph with Dynamo and AOTAutograd, as the default
    # backend does, but generates no C++, which keeps this test to a few seconds on CPU
    torch._dynamo.reset()
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True)

    assert max_difference(compiled, stack, x) < 1e-6


@pytest.mark.slow
def test_torch_compile_inductor():
    # The default inductor backend compiles C++ for the CPU, which took about 20 s in one
    # measurement on a 2-core CPU with torch 2.14
    name, stack, x = EXPORT_CASES[1]
    torch._dynamo.reset()
    compiled = torch.compile(stack, fullgraph=True)

    assert max_difference(compiled, stack, x) < 1e-5


# Invalid arguments


def _conv(**arguments):
    return make_conv(dict(dict(in_channels=6, out_channels=8, kernel_size=3), **arguments))


def _valid_tucker2():
    return torch.zeros(4, 3, 3, 3), [torch.zeros(8, 4), torch.zeros(6, 3)]


def _valid_cp4():
    return torch.ones(5), [torch.zeros(8, 5), torch.zeros(6, 5), torch.zeros(3, 5), torch.zeros(3, 5)]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tucker2_conv(_conv(), torch.zeros(4, 3, 3, 3), [torch.zeros(7, 4), torch.zeros(6, 3)]),
         r"factors\[0\] \(U_T\) must have shape \(8, R_T\); got shape \(7, 4\)"),
        (lambda: tucker2_conv(_conv(), torch.zeros(4, 3, 3, 3), [torch.zeros(8, 4), torch.zeros(6, 3, 1)]),
         r"factors\[1\] \(U_S\) must have shape \(6, R_S\); got shape \(6, 3, 1\)"),
        (lambda: tucker2_conv(_conv(), torch.zeros(4, 2, 3, 3), _valid_tucker2()[1]),
         r"core must have shape \(4, 3, 3, 3\).*got shape \(4, 2, 3, 3\)"),
        (lambda: tucker2_conv(_conv(), torch.zeros(4, 3, 3, 2), _valid_tucker2()[1]),
         r"core must have shape \(4, 3, 3, 3\).*got shape \(4, 3, 3, 2\)"),
        (lambda: tucker2_conv(_conv(), torch.zeros(0, 3, 3, 3), [torch.zeros(8, 0), torch.zeros(6, 3)]),
         r"R_T >= 1; got shape \(8, 0\)"),
        (lambda: tucker2_conv(_conv(), torch.zeros(4, 3, 3, 3), [torch.zeros(8, 4)]),
         r"factors must contain 2 arrays \[U_T, U_S\]; got 1"),
        (lambda: tucker2_conv(_conv(), *_valid_tucker2(), bias_shift=torch.zeros(7)),
         r"bias_shift must have shape \(8\); got shape \(7,\)"),
        (lambda: cp_conv(_conv(), torch.ones(4), _valid_cp4()[1]),
         r"weights must have shape \(5\); got shape \(4,\)"),
        (lambda: cp_conv(_conv(), torch.ones(5), _valid_cp4()[1][:2] + [torch.zeros(2, 5), torch.zeros(3, 5)]),
         r"factors\[2\] \(U_H\) must have shape \(3, 5\); got shape \(2, 5\)"),
        (lambda: cp_conv(_conv(), torch.ones(5), _valid_cp4()[1][:3] + [torch.zeros(3, 4)]),
         r"factors\[3\] \(U_W\) must have shape \(3, 5\); got shape \(3, 4\)"),
        (lambda: cp_conv(_conv(), torch.ones(5), [torch.zeros(8, 5), torch.zeros(5, 5), torch.zeros(9, 5)], layout="cp3"),
         r"factors\[1\] \(U_S\) must have shape \(6, 5\); got shape \(5, 5\)"),
        (lambda: cp_conv(_conv(), torch.ones(5), [torch.zeros(8, 5), torch.zeros(6, 5), torch.zeros(6, 5)], layout="cp3"),
         r"factors\[2\] \(U_K\) must have shape \(9, 5\); got shape \(6, 5\)"),
        (lambda: cp_conv(_conv(), *_valid_cp4(), layout="cp5"),
         r"layout must be one of \('cp4', 'cp3'\); got 'cp5'"),
        (lambda: cp_conv(_conv(), *_valid_cp4(), layout="cp3"),
         r"factors must contain 3 arrays \[U_T, U_S, U_K\]; got 4"),
        (lambda: low_rank_conv1x1(_conv(kernel_size=1), torch.zeros(8, 2), torch.zeros(3, 6)),
         r"right must have shape \(2, 6\); got shape \(3, 6\)"),
        (lambda: low_rank_conv1x1(_conv(), torch.zeros(8, 2), torch.zeros(2, 6)),
         r"kernel_size=\(1, 1\); got kernel_size=\(3, 3\)"),
        (lambda: low_rank_linear(nn.Linear(6, 8), torch.zeros(6, 2), torch.zeros(2, 6)),
         r"left must have shape \(8, R\); got shape \(6, 2\)"),
        (lambda: tucker2_conv(_conv(groups=2), torch.zeros(4, 3, 3, 3), [torch.zeros(8, 4), torch.zeros(3, 3)]),
         r"groups=1; got groups=2"),
        (lambda: cp_conv(_conv(in_channels=8, groups=8), *_valid_cp4()),
         r"groups=1; got groups=8"),
        (lambda: low_rank_conv1x1(_conv(kernel_size=1, groups=2), torch.zeros(8, 2), torch.zeros(2, 3)),
         r"groups=1; got groups=2"),
    ],
    ids=[
        "tucker2-output-factor", "tucker2-input-factor-ndim", "tucker2-core-rank", "tucker2-core-kernel",
        "tucker2-rank-zero", "tucker2-factor-count", "bias-shift", "cp-weights", "cp4-height-factor",
        "cp4-width-factor", "cp3-input-factor", "cp3-kernel-factor", "cp-layout", "cp3-factor-count",
        "conv1x1-right", "conv1x1-kernel", "linear-left", "tucker2-groups", "cp-depthwise", "conv1x1-groups",
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1),
        nn.Conv3d(6, 8, 3),
        nn.Conv1d(6, 8, 3),
        nn.Linear(6, 8),
    ],
    ids=["conv-transpose-2d", "conv3d", "conv1d", "linear"],
)
@pytest.mark.parametrize("builder", ["tucker2", "cp4", "conv1x1"])
def test_unsupported_layer_raises_type_error(layer, builder):
    with pytest.raises(TypeError, match="not supported|does not support"):
        if builder == "tucker2":
            tucker2_conv(layer, *_valid_tucker2())
        elif builder == "cp4":
            cp_conv(layer, *_valid_cp4())
        else:
            low_rank_conv1x1(layer, torch.zeros(8, 2), torch.zeros(2, 6))


def test_low_rank_linear_rejects_conv():
    with pytest.raises(TypeError, match="supports torch.nn.Linear layers only; got Conv2d"):
        low_rank_linear(_conv(kernel_size=1), torch.zeros(8, 2), torch.zeros(2, 6))


# Parameter and MAC counts


def test_count_parameters_tucker2_and_cp4():
    conv = make_conv(CONV_CASES[2][1])  # Conv2d(64, 64, 3, dilation=2, padding=2)
    generator = torch.Generator().manual_seed(9)
    core = torch.randn(16, 8, 3, 3, generator=generator)
    tucker2 = tucker2_conv(conv, core, [torch.randn(64, 16, generator=generator), torch.randn(64, 8, generator=generator)])
    weights, factors = random_cp(conv.weight.shape, 16, "cp4")
    cp4 = cp_conv(conv, weights, factors)

    assert count_parameters(conv) == 64 * 64 * 9 + 64
    # S R_S + R_S R_T K + R_T T, plus the bias: 512 + 1152 + 1024 + 64
    assert count_parameters(tucker2) == 2752
    # R (S + kh + kw + T), plus the bias: 16 * 134 + 64
    assert count_parameters(cp4) == 2208


def test_count_parameters_shared_once():
    layer = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(layer, layer)) == 20


def test_conv_macs_stride_4_kernel_11():
    conv = make_conv(CONV_CASES[0][1], torch.float32)  # Conv2d(3, 64, 11, stride=4, padding=2)
    core, factors = torch.zeros(16, 3, 11, 11), [torch.zeros(64, 16), torch.zeros(3, 3)]
    weights, cp_factors = random_cp(conv.weight.shape, 16, "cp4")

    # 55 * 55 outputs, each 64 * 3 * 11 * 11 MACs
    assert conv_macs(conv, (224, 224)) == 70_276_800
    # 224^2 * 3 * 3 + 55^2 * 16 * 3 * 121 + 55^2 * 64 * 16
    assert conv_macs(tucker2_conv(conv, core, factors), 224) == 451_584 + 17_569_200 + 3_097_600
    # 224^2 * 3 * 16 + (55 * 224) * 16 * 11 + 55^2 * 16 * 11 + 55^2 * 64 * 16
    assert conv_macs(cp_conv(conv, weights, cp_factors), (224, 224)) == 2_408_448 + 2_168_320 + 532_400 + 3_097_600


def test_conv_macs_geometry():
    # 'same' keeps 9 x 10, even kernel included: 90 * 64 * 32 * 16
    assert conv_macs(nn.Conv2d(32, 64, 4, padding="same"), (9, 10)) == 2_949_120
    # Output (7 - 2*(3-1) - 1)//1 + 1 = 3 rows and (11 + 2 - 1*(2-1) - 1)//3 + 1 = 4 columns
    dilated = nn.Conv2d(2, 5, (3, 2), dilation=(2, 1), padding=(0, 1), stride=(1, 3))
    assert conv_macs(dilated, (7, 11)) == 3 * 4 * 5 * 2 * 6
    # Depthwise: in_channels / groups = 1
    assert conv_macs(nn.Conv2d(8, 8, 3, groups=8), (5, 5)) == 9 * 8 * 9
    # Padding layers grow the input of the next convolution to 7 x 9
    stack = nn.Sequential(nn.ReflectionPad2d((1, 2, 0, 1)), nn.Identity(), nn.Conv2d(2, 3, 3))
    assert conv_macs(stack, (6, 6)) == 5 * 7 * 3 * 2 * 9
    assert conv_macs(nn.Sequential(nn.Linear(12, 4, bias=False), nn.Linear(4, 20))) == 48 + 80


def test_conv_macs_rejects_bad_input():
    with pytest.raises(TypeError, match="got ReLU"):
        conv_macs(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()), (5, 5))
    with pytest.raises(ValueError, match=r"input of size \(2, 2\) is too small"):
        conv_macs(nn.Conv2d(2, 3, 3), (2, 2))
    with pytest.raises(ValueError, match="input_size is required"):
        conv_macs(nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match=r"input_size must be an int or a pair"):
        conv_macs(nn.Conv2d(2, 3, 3), (5, 5, 5))
