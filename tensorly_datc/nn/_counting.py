"""Parameter and multiply-accumulate (MAC) counts of convolutional and linear layers.

The counts compare a layer with the stack that replaces it. MACs are those of one input
sample. Bias additions, padding and other element-wise work are not counted.
"""

from torch import nn

__all__ = ["count_parameters", "conv_macs"]

_PADDING_LAYERS = (
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.CircularPad2d,
)


def count_parameters(module):
    """Return the number of scalar parameters of ``module``.

    A parameter shared by several submodules is counted once.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    n_parameters : int

    Examples
    --------
    >>> from torch import nn
    >>> count_parameters(nn.Conv2d(3, 8, 3))
    224
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    return sum(parameter.numel() for parameter in module.parameters())


def conv_macs(module, input_size=None):
    """Count the multiply-accumulate operations of ``module`` on one input sample.

    A ``Conv2d`` costs ``H_out * W_out * out_channels * (in_channels / groups) * kh * kw``
    MACs, with the output size computed from the stride, padding (``'same'`` and
    ``'valid'`` included) and dilation. A ``Linear`` costs ``in_features * out_features``
    MACs, counted once per sample, and leaves the spatial size unchanged. A
    ``Sequential`` passes the output size of each layer on to the next.

    Parameters
    ----------
    module : torch.nn.Conv2d, torch.nn.Linear or torch.nn.Sequential
        A ``Sequential`` may contain these layers, ``Identity``, 2-D padding layers
        (``ZeroPad2d``, ``ConstantPad2d``, ``ReflectionPad2d``, ``ReplicationPad2d``,
        ``CircularPad2d``) and nested ``Sequential`` containers.
    input_size : int or tuple of int, optional
        Spatial size ``(H, W)`` of the input, or one int for a square input. It may be
        omitted only when ``module`` contains no convolution or padding layer.

    Returns
    -------
    macs : int

    Raises
    ------
    TypeError
        If ``module`` or one of its layers is of another type.
    ValueError
        If ``input_size`` is missing where a convolution needs it, or the input is too
        small for a convolution's kernel.

    Examples
    --------
    >>> from torch import nn
    >>> conv_macs(nn.Conv2d(3, 8, 3, padding=1), (32, 32))  # 32 * 32 * 8 * 3 * 3 * 3
    221184
    """
    if input_size is not None:
        input_size = _pair_size(input_size)
    macs, _ = _count_macs(module, input_size)
    return macs


def _pair_size(size):
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, str):
        raise TypeError(f"input_size must be an int or a pair (H, W); got {size!r}")
    try:
        size = tuple(int(n) for n in size)
    except (TypeError, ValueError) as error:
        raise TypeError(f"input_size must be an int or a pair (H, W); got {size!r}") from error
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or a pair (H, W); got {size}")
    return size


def _count_macs(module, size):
    """Return the MACs of ``module`` and its output spatial size for an input of ``size``."""
    if isinstance(module, nn.Sequential):
        total = 0
        for layer in module:
            macs, size = _count_macs(layer, size)
            total += macs
        return total, size

    if isinstance(module, nn.Conv2d):
        size = _require_size(module, size)
        out_size = conv_output_size(module, size)
        kernel_height, kernel_width = module.kernel_size
        macs_per_position = (
            module.out_channels * (module.in_channels // module.groups) * kernel_height * kernel_width
        )
        return out_size[0] * out_size[1] * macs_per_position, out_size

    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features, size

    if isinstance(module, _PADDING_LAYERS):
        size = _require_size(module, size)
        left, right, top, bottom = module.padding
        return 0, (size[0] + top + bottom, size[1] + left + right)

    if isinstance(module, nn.Identity):
        return 0, size

    raise TypeError(
        f"conv_macs supports Conv2d, Linear, Identity, 2-D padding layers and Sequential "
        f"containers of them; got {type(module).__name__}"
    )


def _require_size(module, size):
    if size is None:
        raise ValueError(
            f"input_size is required to count the MACs of {type(module).__name__}; got None"
        )
    return size


def conv_output_size(conv, input_size):
    """Return the spatial output size ``(H_out, W_out)`` of a ``Conv2d`` for an input of size ``(H, W)``.

    Raises
    ------
    ValueError
        If the input, after padding, is smaller than the dilated kernel.
    """
    # PyTorch requires stride 1 with 'same', so the output keeps the input size.
    if conv.padding == "same":
        return tuple(input_size)
    padding = (0, 0) if conv.padding == "valid" else conv.padding

    out_size = []
    for size, kernel, stride, pad, dilation in zip(
        input_size, conv.kernel_size, conv.stride, padding, conv.dilation
    ):
        out_size.append((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
    if min(out_size) < 1:
        raise ValueError(
            f"input of size {tuple(input_size)} is too small for a convolution with "
            f"kernel_size={conv.kernel_size}, padding={conv.padding}, dilation={conv.dilation}; "
            f"the output size would be {tuple(out_size)}"
        )
    return tuple(out_size)
