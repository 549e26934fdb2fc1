"""Build stacks of standard torch layers from the factors of a decomposed layer.

Each builder takes a ``Conv2d`` (or ``Linear``) and factors of its weight, and returns a
plain ``torch.nn.Sequential`` of ``Conv2d`` (or ``Linear``) layers that computes the
factorised layer. The stack keeps the original stride, padding, padding mode, dilation,
bias, dtype, device and training mode, so a stack built from exact factors computes the
original output up to rounding. It contains only standard layers, so ``torch.jit.script``,
``torch.jit.trace``, ``torch.export`` and ``torch.compile`` accept it.

The builders compute no decomposition. Weight shapes follow TensorLy: a convolution
weight ``W`` has shape ``(T, S, kh, kw)``, that is (out_channels, in_channels,
kernel height, kernel width). Factors may be numpy arrays or torch tensors. The builders
combine them in float32 (float64 for a float64 layer) and copy the results into layers
of the original dtype.
"""

import logging

import torch
from torch import nn

__all__ = ["tucker2_conv", "cp_conv", "low_rank_conv1x1", "low_rank_linear", "CP_LAYOUTS"]

logger = logging.getLogger(__name__)

#: Layouts accepted by :func:`cp_conv`: four factors (T, S, kh, kw) or three (T, S, kh*kw).
CP_LAYOUTS = ("cp4", "cp3")


def tucker2_conv(conv, core, factors, *, bias_shift=None):
    """Realise a Tucker-2 decomposition of a ``Conv2d`` weight as three convolutions.

    With ``factors = [U_T, U_S]``, the weight is approximated by
    ``W~ = core x_0 U_T x_1 U_S``, that is
    ``W~[t, s, i, j] = sum_{a, b} core[a, b, i, j] U_T[t, a] U_S[s, b]``.
    The stack is a 1x1 convolution S -> R_S with weight ``U_S^T``, a kh x kw convolution
    R_S -> R_T with weight ``core`` and the original stride, padding, padding mode and
    dilation, and a 1x1 convolution R_T -> T with weight ``U_T`` and the original bias.
    Padding of any mode commutes with a bias-free 1x1 convolution, so the stack computes
    exactly ``conv`` with weight ``W~``.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The layer to replace, with ``groups=1``.
    core : array of shape (R_T, R_S, kh, kw)
    factors : sequence of two arrays
        ``[U_T, U_S]`` of shapes (T, R_T) and (S, R_S), in the form that
        ``tensorly.decomposition.partial_tucker(weight, rank, modes=[0, 1])`` returns
        with ``core``.
    bias_shift : array of shape (T,), optional
        Added to the bias of the last convolution, which gets a bias for it if ``conv``
        has none. It carries the mean-shift correction that a fit in centred input
        statistics needs.

    Returns
    -------
    torch.nn.Sequential
        Three ``Conv2d`` layers.

    Raises
    ------
    TypeError
        If ``conv`` is not a ``torch.nn.Conv2d``.
    ValueError
        If ``conv`` is grouped or an array has a shape that does not match ``conv``.
    """
    _check_conv2d(conv, "tucker2_conv")
    out_channels, in_channels, kernel_height, kernel_width = conv.weight.shape
    output_factor, input_factor = _unpack_factors(factors, "[U_T, U_S]")

    output_factor = _to_tensor(output_factor, "factors[0] (U_T)", (out_channels, "R_T"), conv.weight)
    input_factor = _to_tensor(input_factor, "factors[1] (U_S)", (in_channels, "R_S"), conv.weight)
    rank_out, rank_in = output_factor.shape[1], input_factor.shape[1]
    core = _to_tensor(
        core,
        "core",
        (rank_out, rank_in, kernel_height, kernel_width),
        conv.weight,
        meaning="(R_T, R_S, kh, kw) from the factors and the kernel",
    )
    bias = _output_bias(conv, bias_shift, out_channels)

    project = _new_conv(conv, in_channels, rank_in, 1)
    _copy_parameters(project, input_factor.T.reshape(rank_in, in_channels, 1, 1))

    # The core convolution takes every geometric argument of the original layer.
    spatial = _new_conv(
        conv,
        rank_in,
        rank_out,
        (kernel_height, kernel_width),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        padding_mode=conv.padding_mode,
    )
    _copy_parameters(spatial, core)

    expand = _new_conv(conv, rank_out, out_channels, 1, bias=bias is not None)
    _copy_parameters(expand, output_factor.reshape(out_channels, rank_out, 1, 1), bias)
    return _sequential(conv, project, spatial, expand)


def cp_conv(conv, weights, factors, *, layout="cp4", bias_shift=None):
    """Realise a CP decomposition of a ``Conv2d`` weight as a stack of convolutions.

    For ``layout='cp4'`` (the layout of Lebedev et al. [1]_) the weight is approximated
    by ``W~[t, s, i, j] = sum_r weights[r] U_T[t, r] U_S[s, r] U_H[i, r] U_W[j, r]``, and
    the stack is a 1x1 convolution S -> R, a depthwise kh x 1 convolution with the
    vertical stride, padding and dilation, a depthwise 1 x kw convolution with the
    horizontal ones, and a 1x1 convolution R -> T with the bias. For ``layout='cp3'``,
    ``U_K`` of shape (kh*kw, R) replaces ``U_H`` and ``U_W`` (row ``i * kw + j`` for tap
    ``(i, j)``), and one depthwise kh x kw convolution with the original stride, padding
    and dilation replaces the two depthwise ones. ``weights`` is folded into the last
    convolution.

    Depthwise layers with a 1x1 kernel would only rescale channels, so they are left out.
    A kernel of height or width 1 gets a single depthwise convolution (the ``'cp3'``
    stack), and a 1x1 kernel gets two 1x1 convolutions as in :func:`low_rank_conv1x1`.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The layer to replace, with ``groups=1``.
    weights : array of shape (R,) or None
        Weight of each rank-one term. None means all ones.
    factors : sequence of arrays
        ``[U_T, U_S, U_H, U_W]`` of shapes (T, R), (S, R), (kh, R), (kw, R) for
        ``'cp4'``; ``[U_T, U_S, U_K]`` of shapes (T, R), (S, R), (kh*kw, R) for ``'cp3'``.
        A TensorLy ``CPTensor`` can be passed as ``cp_conv(conv, *cp_tensor)``.
    layout : {'cp4', 'cp3'}, default is 'cp4'
        'cp4' separates the two kernel axes (fewer parameters: R (kh + kw) against
        R kh kw), 'cp3' keeps one spatial factor and can fit the weight more closely at
        the same rank.
    bias_shift : array of shape (T,), optional
        Added to the bias of the last convolution, which gets a bias for it if ``conv``
        has none.

    Returns
    -------
    torch.nn.Sequential
        ``Conv2d`` layers, the middle ones depthwise (``groups=R``).

    Raises
    ------
    TypeError
        If ``conv`` is not a ``torch.nn.Conv2d``.
    ValueError
        If ``layout`` is unknown, ``conv`` is grouped, or an array has a shape that does
        not match ``conv``.

    References
    ----------
    .. [1] V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up
           Convolutional Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015.
    """
    if layout not in CP_LAYOUTS:
        raise ValueError(f"layout must be one of {CP_LAYOUTS}; got {layout!r}")
    _check_conv2d(conv, "cp_conv")
    out_channels, in_channels, kernel_height, kernel_width = conv.weight.shape

    output_factor, input_factor, height_factor, width_factor, kernel_factor = _cp_factor_tensors(
        conv, factors, layout
    )
    rank = output_factor.shape[1]

    # Fold the weights into the last factor
    if weights is not None:
        weights = _to_tensor(weights, "weights", (rank,), conv.weight)
        output_factor = output_factor * weights
    bias = _output_bias(conv, bias_shift, out_channels)

    if kernel_height == 1 and kernel_width == 1:
        logger.debug("cp_conv: 1x1 kernel realised as two 1x1 convolutions of rank %d", rank)
        return _conv1x1_pair(conv, output_factor * kernel_factor[0], input_factor.T, bias)

    project = _new_conv(conv, in_channels, rank, 1)
    _copy_parameters(project, input_factor.T.reshape(rank, in_channels, 1, 1))
    if layout == "cp4" and kernel_height > 1 and kernel_width > 1:
        spatial = _separable_depthwise(conv, height_factor, width_factor)
    else:
        spatial = [_depthwise(conv, kernel_factor)]
    expand = _new_conv(conv, rank, out_channels, 1, bias=bias is not None)
    _copy_parameters(expand, output_factor.reshape(out_channels, rank, 1, 1), bias)
    return _sequential(conv, project, *spatial, expand)


def low_rank_conv1x1(conv, left, right, *, bias_shift=None):
    """Realise a low-rank factorisation of a 1x1 ``Conv2d`` as two 1x1 convolutions.

    With ``W_mat = W.reshape(T, S) ~ left @ right``, the stack is a bias-free 1x1
    convolution S -> R with weight ``right`` and the original stride, padding, padding
    mode and dilation, then a 1x1 convolution R -> T with weight ``left`` and the
    original bias. Positions in the zero padding give 0 after the first convolution and
    the bias after the second, as in the original layer.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        A layer with ``kernel_size=(1, 1)`` and ``groups=1``.
    left : array of shape (T, R)
    right : array of shape (R, S)
    bias_shift : array of shape (T,), optional
        Added to the bias of the second convolution, which gets a bias for it if ``conv``
        has none.

    Returns
    -------
    torch.nn.Sequential
        Two ``Conv2d`` layers.

    Raises
    ------
    TypeError
        If ``conv`` is not a ``torch.nn.Conv2d``.
    ValueError
        If the kernel is not 1x1, ``conv`` is grouped, or ``left`` or ``right`` has a
        shape that does not match ``conv``.
    """
    _check_conv2d(conv, "low_rank_conv1x1")
    if tuple(conv.kernel_size) != (1, 1):
        raise ValueError(
            f"low_rank_conv1x1 needs a layer with kernel_size=(1, 1); got kernel_size="
            f"{tuple(conv.kernel_size)}. Use tucker2_conv or cp_conv for larger kernels."
        )
    out_channels, in_channels = conv.weight.shape[:2]
    left = _to_tensor(left, "left", (out_channels, "R"), conv.weight)
    right = _to_tensor(right, "right", (left.shape[1], in_channels), conv.weight)
    bias = _output_bias(conv, bias_shift, out_channels)
    return _conv1x1_pair(conv, left, right, bias)


def low_rank_linear(linear, left, right, *, bias_shift=None):
    """Realise a low-rank factorisation of a ``Linear`` layer as two ``Linear`` layers.

    With ``W ~ left @ right`` for the weight ``W`` of shape (T, S), the stack is
    ``Linear(S, R, bias=False)`` with weight ``right``, then ``Linear(R, T)`` with weight
    ``left`` and the original bias.

    Parameters
    ----------
    linear : torch.nn.Linear
    left : array of shape (T, R)
    right : array of shape (R, S)
    bias_shift : array of shape (T,), optional
        Added to the bias of the second layer, which gets a bias for it if ``linear``
        has none.

    Returns
    -------
    torch.nn.Sequential
        Two ``Linear`` layers.

    Raises
    ------
    TypeError
        If ``linear`` is not a ``torch.nn.Linear``.
    ValueError
        If ``left`` or ``right`` has a shape that does not match ``linear``.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(
            f"low_rank_linear supports torch.nn.Linear layers only; got {type(linear).__name__}, "
            f"which is not supported"
        )
    _check_initialized(linear, "low_rank_linear")
    out_features, in_features = linear.weight.shape
    left = _to_tensor(left, "left", (out_features, "R"), linear.weight)
    right = _to_tensor(right, "right", (left.shape[1], in_features), linear.weight)
    bias = _output_bias(linear, bias_shift, out_features)

    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    project = nn.Linear(in_features, right.shape[0], bias=False, **factory)
    _copy_parameters(project, right)
    expand = nn.Linear(left.shape[1], out_features, bias=bias is not None, **factory)
    _copy_parameters(expand, left, bias)
    return _sequential(linear, project, expand)


def _conv1x1_pair(conv, left, right, bias):
    """Build the two 1x1 convolutions ``right`` then ``left``, the first with the geometry of ``conv``."""
    out_channels, rank = left.shape
    in_channels = right.shape[1]
    project = _new_conv(
        conv,
        in_channels,
        rank,
        1,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        padding_mode=conv.padding_mode,
    )
    _copy_parameters(project, right.reshape(rank, in_channels, 1, 1))
    expand = _new_conv(conv, rank, out_channels, 1, bias=bias is not None)
    _copy_parameters(expand, left.reshape(out_channels, rank, 1, 1), bias)
    return _sequential(conv, project, expand)


def _cp_factor_tensors(conv, factors, layout):
    """Check the CP factors against ``conv`` and return them as tensors.

    Returns ``U_T, U_S, U_H, U_W, U_K``. For 'cp4', ``U_K`` of shape (kh*kw, R) is the
    row-wise product of ``U_H`` and ``U_W``. For 'cp3', ``U_H`` and ``U_W`` are None.
    """
    out_channels, in_channels, kernel_height, kernel_width = conv.weight.shape
    if layout == "cp4":
        output_factor, input_factor, height_factor, width_factor = _unpack_factors(
            factors, "[U_T, U_S, U_H, U_W]"
        )
    else:
        output_factor, input_factor, kernel_factor = _unpack_factors(factors, "[U_T, U_S, U_K]")
        height_factor = width_factor = None

    output_factor = _to_tensor(output_factor, "factors[0] (U_T)", (out_channels, "R"), conv.weight)
    rank = output_factor.shape[1]
    input_factor = _to_tensor(input_factor, "factors[1] (U_S)", (in_channels, rank), conv.weight)
    if layout == "cp4":
        height_factor = _to_tensor(height_factor, "factors[2] (U_H)", (kernel_height, rank), conv.weight)
        width_factor = _to_tensor(width_factor, "factors[3] (U_W)", (kernel_width, rank), conv.weight)
        kernel_factor = torch.einsum("ir,jr->ijr", height_factor, width_factor)
        kernel_factor = kernel_factor.reshape(kernel_height * kernel_width, rank)
    else:
        kernel_factor = _to_tensor(
            kernel_factor, "factors[2] (U_K)", (kernel_height * kernel_width, rank), conv.weight
        )
    return output_factor, input_factor, height_factor, width_factor, kernel_factor


def _separable_depthwise(conv, height_factor, width_factor):
    """Build the depthwise kh x 1 and 1 x kw convolutions of the 'cp4' stack.

    Each pass pads only its own axis. Zero, reflect, replicate and circular padding of
    the two axes in turn equals the joint 2-D padding, and a convolution along one axis
    commutes with padding along the other, so the pair computes the separable kh x kw
    convolution exactly. With padding='same' PyTorch splits an odd total padding with the
    extra row or column after the input, and each pass does so on its own axis.
    """
    rank = height_factor.shape[1]
    if isinstance(conv.padding, str):
        vertical_padding = horizontal_padding = conv.padding
    else:
        vertical_padding, horizontal_padding = (conv.padding[0], 0), (0, conv.padding[1])

    vertical = _new_conv(
        conv,
        rank,
        rank,
        (height_factor.shape[0], 1),
        stride=(conv.stride[0], 1),
        padding=vertical_padding,
        dilation=(conv.dilation[0], 1),
        groups=rank,
        padding_mode=conv.padding_mode,
    )
    _copy_parameters(vertical, height_factor.T.reshape(rank, 1, -1, 1))
    horizontal = _new_conv(
        conv,
        rank,
        rank,
        (1, width_factor.shape[0]),
        stride=(1, conv.stride[1]),
        padding=horizontal_padding,
        dilation=(1, conv.dilation[1]),
        groups=rank,
        padding_mode=conv.padding_mode,
    )
    _copy_parameters(horizontal, width_factor.T.reshape(rank, 1, 1, -1))
    return [vertical, horizontal]


def _depthwise(conv, kernel_factor):
    """Build one depthwise convolution with the kernel and every geometric argument of ``conv``."""
    rank = kernel_factor.shape[1]
    depthwise = _new_conv(
        conv,
        rank,
        rank,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=rank,
        padding_mode=conv.padding_mode,
    )
    _copy_parameters(depthwise, kernel_factor.T.reshape(rank, 1, *conv.kernel_size))
    return depthwise


def _check_conv2d(conv, builder):
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise TypeError(
            f"{builder} does not support transposed convolutions ({type(conv).__name__}), "
            f"whose weight has shape (in_channels, out_channels / groups, ...); "
            f"it supports torch.nn.Conv2d only"
        )
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"{builder} supports torch.nn.Conv2d layers only; got {type(conv).__name__}, "
            f"which is not supported"
        )
    _check_initialized(conv, builder)
    if conv.groups != 1:
        raise ValueError(
            f"{builder} supports only convolutions with groups=1; got groups={conv.groups}. "
            f"The factors of a grouped convolution would mix channels across groups."
        )


def _check_initialized(layer, builder):
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{builder} got a lazy {type(layer).__name__} whose weight is not initialised; "
            f"run one forward pass through it first"
        )


def _unpack_factors(factors, names):
    n_factors = names.count(",") + 1
    if isinstance(factors, (str, bytes)) or not hasattr(factors, "__len__"):
        raise TypeError(f"factors must be a sequence {names}; got {type(factors).__name__}")
    if len(factors) != n_factors:
        raise ValueError(f"factors must contain {n_factors} arrays {names}; got {len(factors)}")
    return list(factors)


def _compute_dtype(dtype):
    """Return the dtype in which the factors are combined: float64 for float64 layers, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_tensor(value, name, expected_shape, like, meaning=None):
    """Convert ``value`` to a tensor on the device of ``like`` and check its shape.

    ``expected_shape`` contains an int for each fixed size and a rank symbol such as
    ``'R_T'`` for each free one, which must be at least 1.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        tensor = torch.as_tensor(value)
    shape = tuple(tensor.shape)
    expected_text = "(" + ", ".join(str(size) for size in expected_shape) + ")"
    if meaning is not None:
        expected_text += f", which is {meaning}"

    matches = len(shape) == len(expected_shape) and all(
        isinstance(expected, str) or size == expected for size, expected in zip(shape, expected_shape)
    )
    if not matches:
        raise ValueError(f"{name} must have shape {expected_text}; got shape {shape}")
    for size, expected in zip(shape, expected_shape):
        if isinstance(expected, str) and size < 1:
            raise ValueError(
                f"{name} must have shape {expected_text} with {expected} >= 1; got shape {shape}"
            )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor.to(device=like.device, dtype=_compute_dtype(like.dtype))


def _output_bias(layer, bias_shift, out_features):
    """Return the bias of the last layer of the stack: the original bias plus ``bias_shift``, or None."""
    bias = None if layer.bias is None else layer.bias.detach().to(_compute_dtype(layer.bias.dtype))
    if bias_shift is None:
        return bias
    shift = _to_tensor(bias_shift, "bias_shift", (out_features,), layer.weight)
    return shift if bias is None else bias + shift


def _new_conv(like, in_channels, out_channels, kernel_size, *, bias=False, **geometry):
    """Create a ``Conv2d`` on the device and with the dtype of ``like``.

    The layer has no bias unless ``bias=True``.
    """
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        bias=bias,
        device=like.weight.device,
        dtype=like.weight.dtype,
        **geometry,
    )


def _copy_parameters(layer, weight, bias=None):
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(bias)


def _sequential(original, *layers):
    stack = nn.Sequential(*layers)
    stack.train(original.training)
    return stack
