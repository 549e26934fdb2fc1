"""Patch moments of Conv2d inputs, added chunk by chunk to a moment accumulator.

Three routes give the same sums. Convolutions with few input channels, or padding other than
zeros, unfold their im2col patches. Zero-padded ones with enough channels form them from
products of shifted pixels (:mod:`._shifted_products`), which stride-1 kernels take from
Fourier cross-spectra when that needs fewer products (:mod:`._spectra`).
"""

import math

import torch
import torch.nn.functional as F

from ._shifted_products import _add_shifted_products, _prepare_sums, _ShiftGeometry
from ._spectra import direct_cost, fourier_shape, spectral_cost, spectrum_size


def _writes_sums(accumulator):
    """Return whether ``accumulator`` takes its float64 sums written directly, as the moment
    accumulator of :mod:`.statistics` does. Others receive unfolded rows through ``update``."""
    return hasattr(accumulator, "sum_outer")


def _conv2d_padding(module):
    """Return the ((top, bottom), (left, right)) padding that ``module`` (a Conv2d) applies."""
    if module.padding == "valid":
        return ((0, 0), (0, 0))
    if module.padding == "same":
        # As in torch.nn.Conv2d (torch 2.x), the extra pixel of an odd total goes after the input.
        padding = []
        for size, dilation in zip(module.kernel_size, module.dilation):
            total = dilation * (size - 1)
            padding.append((total // 2, total - total // 2))
        return tuple(padding)
    return tuple((pad, pad) for pad in module.padding)


def _accumulate_conv2d(accumulator, module, inputs, max_patches_per_chunk):
    """Add the im2col patches of ``module`` (a Conv2d) on ``inputs`` to ``accumulator``.

    Patches are taken for a few images, or for a band of output rows of one image, at a
    time, so at most ``max(max_patches_per_chunk, output width)`` patches enter one product.
    A zero-padded convolution with enough input channels never unfolds them (see
    :func:`_add_shifted_products`). With stride 1 it takes ``kernel_height`` times larger
    chunks in about the same memory, or whole images when Fourier transforms give its
    products faster (see :func:`_spectral_images_per_chunk`). The others unfold them through
    a strided view of the padded input (see :func:`_patch_view`).
    """
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    (top, bottom), (left, right) = _conv2d_padding(module)
    kernel_height, kernel_width = module.kernel_size
    stride_height, stride_width = module.stride
    dilation_height, dilation_width = module.dilation
    span_height = dilation_height * (kernel_height - 1) + 1
    span_width = dilation_width * (kernel_width - 1) + 1
    out_height = (inputs.shape[2] + top + bottom - span_height) // stride_height + 1
    out_width = (inputs.shape[3] + left + right - span_width) // stride_width + 1
    if out_height < 1 or out_width < 1:
        # The layer's own forward raises the error for an input smaller than the kernel.
        return

    # The fast route writes the sums of a moment accumulator. Any other accumulator, such as the
    # joint moments of sequential calibration, receives unfolded rows through its update().
    shifted = _writes_sums(accumulator) and _uses_shifted_products(module)
    # Image coordinates of the input pixel each kernel tap reads for output pixel (0, 0)
    tap_offsets = [
        (i * dilation_height - top, j * dilation_width - left)
        for i in range(kernel_height)
        for j in range(kernel_width)
    ]
    images_per_chunk, rows_per_chunk, spectral_block = _plan_chunks(
        module, inputs, tap_offsets, shifted, (out_height, out_width), max_patches_per_chunk
    )
    # F.pad takes the last dimension first, and calls the "zeros" mode "constant".
    pad = [left, right, top, bottom]
    pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    for start in range(0, inputs.shape[0], images_per_chunk):
        images = inputs[start : start + images_per_chunk]
        if images.dtype not in (torch.float32, torch.float64):
            images = images.to(torch.float32)
        if shifted:
            # The Fourier route reads only strips of the phase images.
            geometry = _ShiftGeometry(images, tap_offsets, module.stride, out_width, copy=spectral_block is None)
        elif any(pad):
            images = F.pad(images, pad, mode=pad_mode)
        for first_row in range(0, out_height, rows_per_chunk):
            output_rows = (first_row, min(first_row + rows_per_chunk, out_height))
            if shifted:
                _add_shifted_products(accumulator, geometry, output_rows, spectral_block)
            else:
                band_start = first_row * stride_height
                band_stop = band_start + (output_rows[1] - first_row - 1) * stride_height + span_height
                _add_unfolded_patches(accumulator, module, images[:, :, band_start:band_stop])


def _plan_chunks(module, inputs, tap_offsets, shifted, out_size, max_patches_per_chunk):
    """Return (images, output rows) per chunk, and the bytes per block of frequencies of the
    Fourier route (None when the products are formed directly)."""
    out_height, out_width = out_size
    block_bytes = 8 * max_patches_per_chunk * module.in_channels * math.prod(module.kernel_size)
    if shifted and module.stride == (1, 1):
        n_images = _spectral_images_per_chunk(inputs, tap_offsets, block_bytes, out_height * out_width)
        if n_images:
            return n_images, out_height, min(block_bytes, _MAX_SPECTRAL_BLOCK_BYTES)
    max_patches_per_chunk *= _chunk_scale(module)
    return _chunk_sizes(out_height, out_width, max_patches_per_chunk) + (None,)


# A convolution with fewer input channels unfolds its patches, because its products of shifted
# pixels are too thin to run at the speed of matrix products. Measured with torch 2.14 on a CPU,
# they were 2 to 20 times slower than unfolding with 3 channels, and twice as fast with 16.
_MIN_SHIFTED_CHANNELS = 16


def _uses_shifted_products(module):
    """Return whether the patch moments of ``module`` (a Conv2d) come from shifted pixels."""
    return module.padding_mode == "zeros" and module.in_channels >= _MIN_SHIFTED_CHANNELS


# Stride-1 convolutions take their products from Fourier transforms when the transforms need
# this many times fewer C x C products (see _spectra.direct_cost). Measured for a 3x3 kernel
# with torch 2.14 on a CPU with 2 threads: 6.5 times fewer products ran 3.0 times faster (32
# channels, 28x28 maps) and 3.3 times fewer 1.75 times faster (512 channels, 7x7). At 1.6 times
# fewer (5x5) both routes took the same time, and at 1.5 times fewer (4x4) transforms lost 20 %.
_MIN_SPECTRAL_SAVING = 2
# Frequencies of one block of the Fourier route take at most this much memory. On the same CPU,
# blocks of 19 MB took 16 to 43 % less time than blocks of 151 MB on ResNet-18's map shapes.
_MAX_SPECTRAL_BLOCK_BYTES = 16 * 2**20


def _spectral_images_per_chunk(inputs, tap_offsets, block_bytes, n_outputs):
    """Return how many whole images of ``inputs`` one chunk of Fourier-transformed products
    takes for a stride-1 kernel with ``tap_offsets`` and ``n_outputs`` output pixels per image,
    or 0 to form the products directly.

    Direct products are kept when they are not ``_MIN_SPECTRAL_SAVING`` times costlier, or
    when the spectra of one image take more than ``block_bytes``. They are also kept when the
    output has fewer than half as many pixels as the input, because the transforms sum every
    pixel pair and border strips would remove most of each sum again. Chunks are about equal.
    """
    n_images, n_channels, height, width = inputs.shape
    shifts = _tap_shifts(tap_offsets)
    if direct_cost(height, width, shifts) < _MIN_SPECTRAL_SAVING * spectral_cost(height, width, shifts):
        return 0
    if 2 * n_outputs < height * width:
        return 0
    # A complex spectrum per channel, kept for every image of the chunk
    real_bytes = 8 if inputs.dtype == torch.float64 else 4
    bytes_per_image = 2 * real_bytes * n_channels * spectrum_size(*fourier_shape(height, width, shifts))
    max_images = block_bytes // bytes_per_image
    if max_images == 0 or n_images <= max_images:
        return max_images
    n_chunks = -(-n_images // max_images)
    return -(-n_images // n_chunks)


def _tap_shifts(tap_offsets):
    """Return the shifts ``offset(u) - offset(t)`` between the taps ``t <= u`` of a kernel."""
    shifts = set()
    for index, first in enumerate(tap_offsets):
        for second in tap_offsets[index:]:
            shifts.add((second[0] - first[0], second[1] - first[1]))
    return sorted(shifts)


def _chunk_scale(module):
    """Return how many times ``max_patches_per_chunk`` patches of ``module`` make one chunk.

    Unfolding keeps two float32 copies of the chunk's patches, K * C values each. Products of
    shifted pixels with stride 1 keep about 2 * kernel_width copies of its pixels, C values
    each, so kernel_height times as many patches take about the same memory.
    """
    if isinstance(module, torch.nn.Conv2d) and _uses_shifted_products(module) and module.stride == (1, 1):
        return module.kernel_size[0]
    return 1


def _add_unfolded_patches(accumulator, module, band):
    """Unfold the patches of ``module`` over ``band`` (padded input rows) into ``accumulator``."""
    patches = _patch_view(module, band)
    n_features = math.prod(patches.shape[1:4])
    if _writes_sums(accumulator):
        # (N, C, kh, kw, oh, ow) -> (D, N * L): one column per patch
        _add_patch_columns(accumulator, patches.permute(1, 2, 3, 0, 4, 5).reshape(n_features, -1))
    else:
        # (N, C, kh, kw, oh, ow) -> (N * L, D): one row per patch
        accumulator.update(patches.permute(0, 4, 5, 1, 2, 3).reshape(-1, n_features))


def _patch_view(module, band):
    """Return the patches of ``module`` over ``band`` as a view of shape (N, C, kh, kw, oh, ow).

    Its features (C, kh, kw) are in the order of :func:`torch.nn.functional.unfold`. One copy
    of this view into the layout a product needs was 4 times as fast as ``unfold`` for a
    3-channel 7x7 kernel with stride 2 (torch 2.14, CPU).
    """
    kernel_height, kernel_width = module.kernel_size
    stride_height, stride_width = module.stride
    dilation_height, dilation_width = module.dilation
    n_images, n_channels, height, width = band.shape
    out_height = (height - dilation_height * (kernel_height - 1) - 1) // stride_height + 1
    out_width = (width - dilation_width * (kernel_width - 1) - 1) // stride_width + 1
    image_stride, channel_stride, row_stride, column_stride = band.stride()
    return band.as_strided(
        (n_images, n_channels, kernel_height, kernel_width, out_height, out_width),
        (
            image_stride,
            channel_stride,
            dilation_height * row_stride,
            dilation_width * column_stride,
            stride_height * row_stride,
            stride_width * column_stride,
        ),
    )


def _chunk_sizes(out_height, out_width, max_patches_per_chunk):
    """Return (images, output rows) per chunk: whole images when one image fits, otherwise
    bands of output rows of one image."""
    patches_per_image = out_height * out_width
    if patches_per_image <= max_patches_per_chunk:
        return max_patches_per_chunk // patches_per_image, out_height
    return 1, max(1, max_patches_per_chunk // out_width)


# Column blocks of at least this many features let the im2col product skip the blocks below the
# diagonal, since the Gram matrix is symmetric. Smaller blocks would make the products slow.
_MIN_GRAM_BLOCK = 64


def _add_patch_columns(accumulator, columns):
    """Add the patches ``columns`` (D, P), one per column, to the sums of ``accumulator``.

    As the ``update`` of the moment accumulator, with the product formed block by block over the
    upper triangle only, and the sum over the chunk formed in the dtype of the patches. A
    float64 copy of the patches took a tenth of the time of a 3-channel 7x7 layer.
    """
    n_features = columns.shape[0]
    _prepare_sums(accumulator, n_features, columns)
    n_blocks = max(1, min(8, n_features // _MIN_GRAM_BLOCK))
    bounds = [n_features * k // n_blocks for k in range(n_blocks + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        block = (columns[start:stop] @ columns[start:].T).to(torch.float64)
        diagonal = block[:, : stop - start]
        # A float32 product is symmetric only up to rounding; the metric checks need exact symmetry.
        accumulator.sum_outer[start:stop, start:stop] += (diagonal + diagonal.T) / 2
        if stop < n_features:
            accumulator.sum_outer[start:stop, stop:] += block[:, stop - start :]
            accumulator.sum_outer[stop:, start:stop] += block[:, stop - start :].T
    accumulator.sum += columns.sum(dim=1).to(torch.float64)
    accumulator.count += columns.shape[1]
