"""Second moments of the inputs of convolutional and linear layers.

The metric of a layer's decomposition is ``Sigma = E[x x^T]``, the uncentred second
moment of the vectors that the layer multiplies by its weight matrix. For a ``Conv2d``
these are the im2col patches, in the order of :func:`torch.nn.functional.unfold`
(channel slowest, then kernel row, then kernel column). For a ``Linear`` they are the
input rows. This module collects the moments with forward pre-hooks in one pass over
calibration data, merges them and stores them in safetensors files.
"""

import hashlib
import itertools
import json
from collections.abc import Mapping
import logging
import math
import operator
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

__all__ = ["InputStatistics", "collect_input_statistics", "save_statistics", "load_statistics"]

from .. import _backend as backend
from ._checks import check_module, check_names, check_positive_int
from ._spectra import direct_cost, fourier_shape, shift_correlations, spectral_cost, spectrum_size

logger = logging.getLogger(__name__)

# Stored in each file's metadata, so that load_statistics rejects other safetensors files.
_FILE_FORMAT = "tensorly_datc.input_statistics.v1"


class InputStatistics:
    """First and second moments of a layer's input vectors.

    Parameters
    ----------
    second_moment : torch.Tensor of shape (D, D)
        Uncentred second moment ``E[x x^T]`` of the input vectors ``x``.
    mean : torch.Tensor of shape (D,)
        Mean ``E[x]`` of the input vectors.
    count : int
        Number of input vectors (patches or rows) the moments average over.

    Both moments are stored as float64 tensors, without a copy when they already are.
    ``a + b`` merges the statistics of two disjoint sets of inputs, weighting each by its
    count, so collecting in parts and merging gives the moments of the whole set.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    >>> stats = InputStatistics(x.T @ x / 2, x.mean(0), count=2)
    >>> stats
    InputStatistics(n_features=2, count=2, device='cpu')
    >>> stats.covariance
    tensor([[1., 1.],
            [1., 1.]], dtype=torch.float64)
    """

    def __init__(self, second_moment, mean, count):
        second_moment = torch.as_tensor(second_moment, dtype=torch.float64)
        mean = torch.as_tensor(mean, dtype=torch.float64, device=second_moment.device)
        if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
            raise ValueError(
                f"second_moment must be a square matrix; got shape {tuple(second_moment.shape)}"
            )
        if mean.shape != second_moment.shape[:1]:
            raise ValueError(
                f"mean must have shape ({second_moment.shape[0]},) to match second_moment; "
                f"got shape {tuple(mean.shape)}"
            )
        count = operator.index(count)
        if count < 0:
            raise ValueError(f"count must be non-negative; got {count}")
        self.second_moment = second_moment
        self.mean = mean
        self.count = count

    @property
    def n_features(self):
        """Dimension D of the input vectors."""
        return self.mean.shape[0]

    @property
    def device(self):
        """Device of the stored moments."""
        return self.second_moment.device

    @property
    def covariance(self):
        """Centred second moment ``E[x x^T] - E[x] E[x]^T``, of shape (D, D).

        A fit in this metric minimises the expected output error only if the mean shift
        ``(W - W~) E[x]`` is then added to the bias of the compressed layer.
        """
        return self.second_moment - torch.outer(self.mean, self.mean)

    def to(self, device):
        """Return the statistics on ``device``, as a copy unless they are already there."""
        device = torch.device(device)
        if device == self.device:
            return self
        return InputStatistics(self.second_moment.to(device), self.mean.to(device), self.count)

    def __add__(self, other):
        if not isinstance(other, InputStatistics):
            return NotImplemented
        if other.n_features != self.n_features:
            raise ValueError(
                "cannot merge input statistics of different sizes: "
                f"{self.n_features} and {other.n_features} features"
            )
        if other.device != self.device:
            raise ValueError(
                f"cannot merge input statistics on different devices: {self.device} and "
                f"{other.device}; move one with .to(device) first"
            )
        count = self.count + other.count
        if count == 0:
            empty_second_moment = torch.zeros_like(self.second_moment)
            return InputStatistics(empty_second_moment, torch.zeros_like(self.mean), 0)

        # Count-weighted average of the two sets' moments
        weight_self, weight_other = self.count / count, other.count / count
        second_moment = self.second_moment * weight_self + other.second_moment * weight_other
        mean = self.mean * weight_self + other.mean * weight_other
        return InputStatistics(second_moment, mean, count)

    def __radd__(self, other):
        # Lets sum() start from its default 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def __repr__(self):
        return (
            f"InputStatistics(n_features={self.n_features}, count={self.count}, "
            f"device='{self.device}')"
        )


class _MomentAccumulator:
    """Running float64 sums of ``x``, ``x x^T`` and the number of vectors ``x``.

    Each chunk's product ``rows^T rows`` is computed in float64 for float64 inputs and in
    float32 otherwise (twice as fast on CPUs and far faster on GPUs), then added to float64
    sums. A chunk holds at most a few thousand rows, so its float32 product is accurate to
    about 1e-6 relative, while the float64 sums keep that accuracy over millions of rows.
    """

    def __init__(self):
        self.sum_outer = None
        self.sum = None
        self.count = 0
        # Blocks of tap pairs held back from sum_outer by the shifted products (see _TapBlocks)
        self.tap_blocks = None

    def update(self, rows):
        """Add the rows of ``rows`` (P, D) to the sums."""
        product_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        rows = rows.to(product_dtype)
        if self.sum_outer is None:
            n_features = rows.shape[1]
            self.sum_outer = rows.new_zeros((n_features, n_features), dtype=torch.float64)
            self.sum = rows.new_zeros(n_features, dtype=torch.float64)
        product = (rows.T @ rows).to(torch.float64)
        # A float32 product is symmetric only up to rounding; the metric checks need exact symmetry.
        self.sum_outer += (product + product.T) / 2
        self.sum += rows.to(torch.float64).sum(dim=0)
        self.count += rows.shape[0]

    def to_statistics(self):
        """Return the moments, dividing the sums in place: the accumulator is spent afterwards."""
        if self.tap_blocks is not None:
            self.tap_blocks.flush(self)
        if self.sum_outer is None:
            # Every patch the shifted products saw read only zero padding.
            self.sum_outer = self.sum.new_zeros((self.sum.shape[0], self.sum.shape[0]))
        # A new array of the size of the sums costs more than the division (page faults).
        self.sum_outer /= self.count
        self.sum /= self.count
        return InputStatistics(self.sum_outer, self.sum, self.count)


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
    :func:`_add_shifted_products`); with stride 1 it takes ``kernel_height`` times larger
    chunks in about the same memory, or whole images when Fourier transforms give its
    products faster (see :func:`_spectral_images_per_chunk`). The others unfold them with
    :func:`torch.nn.functional.unfold`.
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

    # The fast route writes the sums of a _MomentAccumulator. Any other accumulator, such as the
    # joint moments of sequential calibration, receives unfolded rows through its update().
    shifted = isinstance(accumulator, _MomentAccumulator) and _uses_shifted_products(module)
    # Image coordinates of the input pixel each kernel tap reads for output pixel (0, 0)
    tap_offsets = [
        (i * dilation_height - top, j * dilation_width - left)
        for i in range(kernel_height)
        for j in range(kernel_width)
    ]
    block_bytes = 8 * max_patches_per_chunk * module.in_channels * kernel_height * kernel_width
    spectral_images = 0
    if shifted and module.stride == (1, 1):
        spectral_images = _spectral_images_per_chunk(inputs, tap_offsets, block_bytes)
    if spectral_images:
        images_per_chunk, rows_per_chunk = spectral_images, out_height
    else:
        max_patches_per_chunk *= _chunk_scale(module)
        images_per_chunk, rows_per_chunk = _chunk_sizes(out_height, out_width, max_patches_per_chunk)
    # F.pad takes the last dimension first, and calls the "zeros" mode "constant".
    pad = [left, right, top, bottom]
    pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    for start in range(0, inputs.shape[0], images_per_chunk):
        images = inputs[start : start + images_per_chunk]
        if images.dtype not in (torch.float32, torch.float64):
            images = images.to(torch.float32)
        if shifted:
            # The Fourier route reads only strips of the phase images.
            geometry = _ShiftGeometry(images, tap_offsets, module.stride, out_width, copy=not spectral_images)
        elif any(pad):
            images = F.pad(images, pad, mode=pad_mode)
        for first_row in range(0, out_height, rows_per_chunk):
            output_rows = (first_row, min(first_row + rows_per_chunk, out_height))
            if shifted:
                spectral_block = min(block_bytes, _MAX_SPECTRAL_BLOCK_BYTES) if spectral_images else None
                _add_shifted_products(accumulator, geometry, output_rows, spectral_block)
            else:
                band_start = first_row * stride_height
                band_stop = band_start + (output_rows[1] - first_row - 1) * stride_height + span_height
                _add_unfolded_patches(accumulator, module, images[:, :, band_start:band_stop])


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
# blocks of 16 MB were faster than those of 150 MB by 10 to 40 %.
_MAX_SPECTRAL_BLOCK_BYTES = 16 * 2**20


def _spectral_images_per_chunk(inputs, tap_offsets, block_bytes):
    """Return how many whole images of ``inputs`` one chunk of Fourier-transformed products
    takes for a stride-1 kernel with ``tap_offsets``, or 0 to form the products directly.

    Direct products are kept when they are not ``_MIN_SPECTRAL_SAVING`` times costlier, or
    when the spectra of one image take more than ``block_bytes``. Chunks are about equal.
    """
    height, width = inputs.shape[2], inputs.shape[3]
    shifts = _tap_shifts(tap_offsets)
    if direct_cost(height, width, shifts) < _MIN_SPECTRAL_SAVING * spectral_cost(height, width, shifts):
        return 0
    # A complex spectrum per channel, kept for every image of the chunk
    real_bytes = 8 if inputs.dtype == torch.float64 else 4
    bytes_per_image = 2 * real_bytes * inputs.shape[1] * spectrum_size(*fourier_shape(height, width, shifts))
    max_images = block_bytes // bytes_per_image
    if max_images == 0:
        return 0
    n_chunks = -(-inputs.shape[0] // max_images)
    return -(-inputs.shape[0] // n_chunks)


def _tap_shifts(tap_offsets):
    """Return the shifts ``offset(u) - offset(t)`` between the taps ``t <= u`` of a kernel."""
    return sorted(
        {(second[0] - first[0], second[1] - first[1]) for k, first in enumerate(tap_offsets) for second in tap_offsets[k:]}
    )


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
    if isinstance(accumulator, _MomentAccumulator):
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


def _prepare_sums(accumulator, n_features, like):
    """Create the accumulator's float64 sums on the device of ``like`` if it has none yet."""
    if accumulator.sum_outer is None:
        accumulator.sum_outer = like.new_zeros((n_features, n_features), dtype=torch.float64)
    if accumulator.sum is None:
        accumulator.sum = like.new_zeros(n_features, dtype=torch.float64)


# Column blocks of at least this many features let the im2col product skip the blocks below the
# diagonal, since the Gram matrix is symmetric. Smaller blocks would make the products slow.
_MIN_GRAM_BLOCK = 64


def _add_patch_columns(accumulator, columns):
    """Add the patches ``columns`` (D, P), one per column, to the sums of ``accumulator``.

    As :meth:`_MomentAccumulator.update`, with the product formed block by block over the
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


def _clipped_range(band, offset, shift, size, partner_size):
    """Return the range [lo, hi) of pixels that a tap at ``offset`` reads for the output
    ``band``, clipped to its image of ``size`` pixels and to the pixels whose partner ``shift``
    away lies inside an image of ``partner_size`` pixels."""
    return max(band[0] + offset, 0, -shift), min(band[1] + offset, size, partner_size - shift)


class _ShiftGeometry:
    """Where each kernel tap of a zero-padded convolution reads, in phase images.

    With stride ``s``, the taps read input pixels ``s * o + offset`` for output pixels ``o``.
    The input splits into ``s_h * s_w`` phase images, the pixels of equal position modulo the
    stride, and each tap reads one phase image with stride 1, at ``o + base`` with
    ``offset = s * base + phase``. With stride 1 there is one phase image, the input itself.
    The phase images are stored as (H, N, W, C), so that a rectangle of rows is contiguous.
    With ``copy=False`` they are views of ``images`` in that order instead, for callers that
    read only thin strips of them.
    """

    def __init__(self, images, tap_offsets, stride, out_width, copy=True):
        stride_height, stride_width = stride
        self.images = images
        self.out_width = out_width
        self.n_images = images.shape[0]
        self.n_channels = images.shape[1]
        self.taps = [
            ((row % stride_height, column % stride_width), (row // stride_height, column // stride_width))
            for row, column in tap_offsets
        ]
        self.phases = {
            phase: images[:, :, phase[0] :: stride_height, phase[1] :: stride_width].permute(2, 0, 3, 1)
            for phase in sorted({phase for phase, _ in self.taps})
        }
        if copy:
            self.phases = {phase: image.contiguous() for phase, image in self.phases.items()}

    def size(self, phase):
        """Return (height, width) of a phase image."""
        return self.phases[phase].shape[0], self.phases[phase].shape[2]

    def rectangle(self, tap, output_rows, shift=(0, 0), partner_phase=None):
        """Return the rows and columns of its phase image that ``tap`` reads for ``output_rows``.

        With a ``shift`` and ``partner_phase``, only the pixels whose partner ``shift`` away in
        that phase image exists are kept. Returns None when no pixel is left.
        """
        phase, (base_row, base_column) = self.taps[tap]
        height, width = self.size(phase)
        partner_height, partner_width = self.size(phase if partner_phase is None else partner_phase)
        rows = _clipped_range(output_rows, base_row, shift[0], height, partner_height)
        columns = _clipped_range((0, self.out_width), base_column, shift[1], width, partner_width)
        if rows[0] < rows[1] and columns[0] < columns[1]:
            return rows, columns
        return None

    def support(self, key):
        """Return the rows and columns of the pixels ``z`` of phase image ``x`` whose partner
        ``z + shift`` lies in phase image ``y``, for ``key = (phase of x, phase of y, shift)``."""
        phase, partner_phase, shift = key
        height, width = self.size(phase)
        partner_height, partner_width = self.size(partner_phase)
        rows = _clipped_range((0, height), 0, shift[0], height, partner_height)
        columns = _clipped_range((0, width), 0, shift[1], width, partner_width)
        return rows, columns

    def pairs_by_shift(self, output_rows):
        """Group the tap pairs ``t <= u`` by the products they need.

        Returns {(phase of t, phase of u, shift): [(t, u, rows, columns)]} with ``shift =
        base(u) - base(t)`` and the rectangle that tap ``t`` reads for the pair. Pairs whose
        rectangle is empty contribute nothing and are left out.
        """
        pairs = {}
        for t, (phase_t, base_t) in enumerate(self.taps):
            for u in range(t, len(self.taps)):
                phase_u, base_u = self.taps[u]
                shift = (base_u[0] - base_t[0], base_u[1] - base_t[1])
                rectangle = self.rectangle(t, output_rows, shift, phase_u)
                if rectangle is not None:
                    pairs.setdefault((phase_t, phase_u, shift), []).append((t, u) + rectangle)
        return pairs


def _add_shifted_products(accumulator, geometry, output_rows, block_bytes=None):
    """Add the patch moments of a zero-padded convolution without unfolding patches.

    The block of taps ``(t, u)`` of the second moment sums ``x[z] y[z + shift]^T`` over the
    pixels ``z`` that tap ``t`` reads in its phase image ``x``, ``y`` being the phase image of
    ``u`` and ``shift = base(u) - base(t)`` (see :class:`_ShiftGeometry`). Zero padding only
    removes terms. Every tap pair with the same phases and shift sums the same products over
    rectangles that differ by a few boundary rows and columns. So each such group costs one
    product over the union of its rectangles, and each pair subtracts the products of its
    missing strips. A 3x3 kernel then needs 13 products with stride 1 and 34 with stride 2,
    instead of one for each of its 45 tap pairs.

    ``output_rows`` is the band [first, stop) of output rows to add. The blocks are formed in
    the dtype of the images, as the products are, and added to the float64 sums.

    With ``block_bytes``, the band is every output row of a stride-1 convolution, and each
    group's product over all pixels whose partner lies in the image comes from the images'
    Fourier transforms instead (see :func:`._spectra.shift_correlations`, which takes at most
    ``block_bytes`` per block of frequencies). The strips are still direct products.
    """
    products = _ShiftedProducts(geometry.phases)
    pairs_by_key = geometry.pairs_by_shift(output_rows)
    if block_bytes is not None and pairs_by_key:
        shifts = [shift for _, _, shift in pairs_by_key]
        correlations = dict(zip(shifts, shift_correlations(geometry.images, shifts, block_bytes)))
    blocks = {}
    for key, pairs in pairs_by_key.items():
        products.cache.clear()
        if block_bytes is None:
            rows = (min(pair[2][0] for pair in pairs), max(pair[2][1] for pair in pairs))
            columns = (min(pair[3][0] for pair in pairs), max(pair[3][1] for pair in pairs))
            whole = products.sum(key, rows, columns)
        else:
            rows, columns = geometry.support(key)
            whole = correlations[key[2]]
        for t, u, pair_rows, pair_columns in pairs:
            block = _subtract_strips(whole, products, key, rows, columns, pair_rows, pair_columns)
            # Exactly symmetric diagonal blocks, whatever the rounding of the products
            blocks[t, u] = (block + block.T) / 2 if t == u else block
    if accumulator.tap_blocks is None:
        accumulator.tap_blocks = _TapBlocks(len(geometry.taps))
    if blocks:
        accumulator.tap_blocks.add(accumulator, blocks)

    _add_tap_sums(accumulator, geometry, output_rows)
    accumulator.count += geometry.n_images * (output_rows[1] - output_rows[0]) * geometry.out_width


class _TapBlocks:
    """Float64 sums of the blocks of tap pairs ``t <= u``, held back from the second moment.

    Adding the blocks of a chunk to the ``D x D`` sums reads and writes the whole matrix. For
    a layer of many small chunks that took a quarter of the time (128 channels on 28x28 maps,
    one image per chunk, torch 2.14 on a CPU). The blocks of consecutive chunks are summed
    here instead, in about half the memory of the sums, and added to them every
    ``_TAP_BLOCK_CHUNKS`` chunks and when the statistics are read. A single chunk's blocks are
    added as they are. So are the blocks of a layer whose held sums would take more than
    ``_MAX_HELD_BYTES``, because its chunks are large enough that one pass over the sums per
    chunk costs little beside their products.
    """

    def __init__(self, n_taps):
        self.n_taps = n_taps
        self.pairs = [(t, u) for t in range(n_taps) for u in range(t, n_taps)]
        self.first = None
        self.sums = None
        self.n_chunks = 0

    def add(self, accumulator, blocks):
        """Add a chunk's ``{(t, u): block}`` (missing pairs are zero) to the held sums."""
        like = next(iter(blocks.values()))
        shape = (len(self.pairs),) + tuple(like.shape)
        if self.n_chunks == 1 and math.prod(shape) * 8 > _MAX_HELD_BYTES:
            self.flush(accumulator)
        if self.n_chunks == 0:
            self.first = blocks
        else:
            if self.sums is None:
                self.sums = like.new_zeros(shape, dtype=torch.float64)
            if self.first is not None:
                self._add_to_sums(self.first)
                self.first = None
            self._add_to_sums(blocks)
        self.n_chunks += 1
        if self.n_chunks == _TAP_BLOCK_CHUNKS:
            self.flush(accumulator)

    def _add_to_sums(self, blocks):
        zeros = next(iter(blocks.values())).new_zeros(self.sums.shape[1:])
        self.sums += torch.stack([blocks.get(pair, zeros) for pair in self.pairs])

    def flush(self, accumulator):
        """Add the held blocks to ``accumulator.sum_outer`` and start again from zero."""
        if self.n_chunks == 0:
            return
        if self.first is not None:
            blocks, like = self.first, next(iter(self.first.values()))
            self.first = None
        else:
            blocks, like = dict(zip(self.pairs, self.sums)), self.sums
        _add_tap_blocks(accumulator, blocks, self.n_taps, like)
        if self.sums is not None:
            self.sums.zero_()
        self.n_chunks = 0


# Chunks whose tap blocks are summed before they are added to the second moment, and the
# largest float64 sums of tap blocks held per layer (a 3x3 kernel over 256 channels takes 24 MB)
_TAP_BLOCK_CHUNKS = 16
_MAX_HELD_BYTES = 32 * 2**20


def _add_tap_blocks(accumulator, blocks, n_taps, like):
    """Add the blocks ``{(t, u): block}`` (``t <= u``) of the second moment, and the transposed
    blocks below the diagonal, to ``accumulator.sum_outer`` in channel-major order.

    For each tap ``t`` the blocks of all taps ``u`` are interleaved into the rows of
    ``sum_outer`` for tap ``t``, which are contiguous, so the float64 sums are read and written
    once. The first chunk of a layer with every block present sets the sums instead.
    """
    n_channels = like.shape[-1]
    size = n_channels * n_taps
    if accumulator.sum_outer is None and len(blocks) == n_taps * (n_taps + 1) // 2:
        accumulator.sum_outer = like.new_empty((size, size), dtype=torch.float64)
        _prepare_sums(accumulator, size, like)
        assign = True
    else:
        _prepare_sums(accumulator, size, like)
        assign = False
    zeros = like.new_zeros((n_channels, n_channels))
    rows_by_tap = accumulator.sum_outer.view(n_channels, n_taps, size)
    for t in range(n_taps):
        row = [
            blocks.get((t, u), zeros) if u >= t else blocks.get((u, t), zeros).T for u in range(n_taps)
        ]
        # (C, C, K) -> (C, C * K): columns in the (channel, tap) order of the sums
        interleaved = torch.stack(row, dim=-1).reshape(n_channels, size)
        if assign:
            rows_by_tap[:, t] = interleaved
        else:
            rows_by_tap[:, t] += interleaved


def _outside(full, subrange):
    """Return the parts of the range ``full`` before and after its ``subrange``."""
    return [part for part in ((full[0], subrange[0]), (subrange[1], full[1])) if part[0] < part[1]]


def _subtract_strips(whole, products, key, rows, columns, pair_rows, pair_columns):
    """Return the products over ``pair_rows x pair_columns`` from those over ``rows x columns``.

    By inclusion-exclusion: minus the full-width strips above and below, minus the full-height
    strips left and right, plus the corners both remove.
    """
    outside_rows = _outside(rows, pair_rows)
    outside_columns = _outside(columns, pair_columns)
    if not outside_rows and not outside_columns:
        return whole
    block = whole.clone()
    for strip_rows in outside_rows:
        block -= products.sum(key, strip_rows, columns)
    for strip_columns in outside_columns:
        block -= products.sum(key, rows, strip_columns)
        for strip_rows in outside_rows:
            block += products.sum(key, strip_rows, strip_columns)
    return block


def _add_tap_sums(accumulator, geometry, output_rows):
    """Add the sum of each tap's entries over the patches to ``accumulator.sum``.

    Tap ``t`` reads a rectangle of its phase image, so its sum is the total over that
    rectangle of the pixel sums over the chunk's images. These are formed in the dtype of the
    images, which is faster than converting the images first, and summed further in float64.
    """
    if accumulator.sum is None:
        like = next(iter(geometry.phases.values()))
        accumulator.sum = like.new_zeros(geometry.n_channels * len(geometry.taps), dtype=torch.float64)
    sums = accumulator.sum.view(geometry.n_channels, len(geometry.taps))
    rectangles = {}
    for t in range(len(geometry.taps)):
        rectangle = geometry.rectangle(t, output_rows)
        # A tap that reads only padding for this band adds nothing.
        if rectangle is not None:
            rectangles.setdefault(geometry.taps[t][0], []).append((t,) + rectangle)
    for phase, taps in rectangles.items():
        image = geometry.phases[phase]
        band = (min(rows[0] for _, rows, _ in taps), max(rows[1] for _, rows, _ in taps))
        # (rows, W, C): the sum over the images of each pixel of the band
        per_pixel = image[band[0] : band[1]].sum(dim=1).to(torch.float64)
        for t, rows, columns in taps:
            rectangle = per_pixel[rows[0] - band[0] : rows[1] - band[0], columns[0] : columns[1]]
            sums[:, t] += rectangle.sum(dim=(0, 1))


class _ShiftedProducts:
    """Sums of ``x[z] y[z + shift]^T`` over rectangles of pixels of phase images, with caches.

    The products run in the dtype of the images (float32 or float64). Column ranges of the
    phase images are copied once each and reused, since slicing rows of a copy is free, except
    for strips of a few rows, which are copied alone when their columns have no copy yet. The
    sums are cached until the caller clears ``cache``, since tap pairs share their strips.
    """

    def __init__(self, phases):
        self.phases = phases
        self.column_slices = {}
        self.cache = {}

    def _columns(self, phase, start, stop):
        key = (phase, start, stop)
        if key not in self.column_slices:
            self.column_slices[key] = self.phases[phase][:, :, start:stop].contiguous()
        return self.column_slices[key]

    def _pixels(self, phase, rows, columns):
        """Return the pixels of ``rows x columns`` of a phase image as a (P, C) matrix."""
        image = self.phases[phase]
        if (phase,) + columns not in self.column_slices and 4 * (rows[1] - rows[0]) <= image.shape[0]:
            return image[rows[0] : rows[1], :, columns[0] : columns[1]].reshape(-1, image.shape[3])
        return self._columns(phase, *columns)[rows[0] : rows[1]].reshape(-1, image.shape[3])

    def sum(self, key, rows, columns):
        """Return ``sum x[z] y[z + shift]^T`` over ``z`` in ``rows x columns``, of shape (C, C),
        for ``key = (phase of x, phase of y, shift)``."""
        cache_key = (key, rows, columns)
        if cache_key not in self.cache:
            phase, partner_phase, shift = key
            first = self._pixels(phase, rows, columns)
            partner_rows = (rows[0] + shift[0], rows[1] + shift[0])
            partner_columns = (columns[0] + shift[1], columns[1] + shift[1])
            second = self._pixels(partner_phase, partner_rows, partner_columns)
            self.cache[cache_key] = first.T @ second
        return self.cache[cache_key]


def _accumulate_linear(accumulator, module, inputs, max_patches_per_chunk):
    """Add the input rows of ``module`` (a Linear) on ``inputs`` (*, in_features)."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    for start in range(0, rows.shape[0], max_patches_per_chunk):
        accumulator.update(rows[start : start + max_patches_per_chunk])


# Accumulation function of each layer type. A faster replacement (for example one that
# multiplies shifted feature maps instead of unfolded patches) must add the same float64 sums.
_ACCUMULATORS = {torch.nn.Conv2d: _accumulate_conv2d, torch.nn.Linear: _accumulate_linear}


def _accumulation_function(module):
    """Return the accumulation function for ``module``'s type, or None if it has none."""
    for layer_type, function in _ACCUMULATORS.items():
        if isinstance(module, layer_type):
            return function
    return None


def _select_layers(model, layers):
    """Return {name: module} of the layers to collect, skipping grouped convolutions."""
    modules = dict(model.named_modules())
    if layers is None:
        candidates = {
            name: module
            for name, module in modules.items()
            if _accumulation_function(module) is not None
        }
    else:
        names = [layers] if isinstance(layers, str) else check_names(layers, "layers")
        unknown = [name for name in names if name not in modules]
        if unknown:
            collectable = [name for name, module in modules.items() if _accumulation_function(module)]
            listed = ", ".join(repr(name) for name in collectable[:10])
            more = f" and {len(collectable) - 10} more" if len(collectable) > 10 else ""
            raise ValueError(
                f"layers not found in the model: {unknown}; its Conv2d and Linear layers are "
                f"{listed}{more}"
            )
        unsupported = [
            f"{name} ({type(modules[name]).__name__})"
            for name in names
            if _accumulation_function(modules[name]) is None
        ]
        if unsupported:
            raise ValueError(
                f"layers must be nn.Conv2d or nn.Linear modules; got {', '.join(unsupported)}"
            )
        candidates = {name: modules[name] for name in names}

    # A grouped convolution has one weight matrix, and so one metric, per group.
    # NOTE: per-group statistics are not collected, so these layers are skipped.
    # The skip is logged as a warning for a layer the caller named, as information otherwise.
    level = logging.INFO if layers is None else logging.WARNING
    selected = {}
    for name, module in candidates.items():
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            logger.log(level, "Skipping layer %s: grouped convolution (groups=%d)", name, module.groups)
        else:
            selected[name] = module
    return selected


def _iterate_inputs(data, batch_size):
    """Yield the input tensor of each batch of ``data``."""
    if isinstance(data, torch.Tensor):
        yield from torch.split(data, batch_size)
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                "each batch must be a tensor or a tuple/list whose first element is the "
                f"input tensor; got {type(batch).__name__}"
            )
        yield batch


def _batch_count(data, batch_size):
    """Return the number of batches for the progress bar, or None if unknown."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    try:
        return len(data)
    except TypeError:
        return None


class _BufferedHook:
    """Forward pre-hook that adds a layer's inputs to ``accumulator``, a chunk at a time.

    Inputs of consecutive batches are held back until their input positions (pixels for a
    convolution, rows for a linear layer) fill a chunk of ``chunk_positions``, and then added
    together. Layers with small inputs, such as the last stages of a CNN, would otherwise pay
    the float64 update of the ``D x D`` sums once per batch, which can cost more than their
    products. Call :meth:`flush` after the last batch.
    """

    def __init__(self, name, accumulator, accumulate, max_patches_per_chunk, chunk_positions):
        self.name = name
        self.accumulator = accumulator
        self.accumulate = accumulate
        self.max_patches_per_chunk = max_patches_per_chunk
        self.chunk_positions = chunk_positions
        self.module = None
        self.pending = []
        self.pending_positions = 0

    def __call__(self, module, args, kwargs):
        inputs = args[0] if args else kwargs["input"]
        if not backend.is_finite(inputs):
            raise ValueError(f"the input of layer {self.name} contains non-finite values (NaN or inf)")
        inputs = inputs.detach()
        if isinstance(module, torch.nn.Conv2d) and inputs.ndim == 3:
            inputs = inputs.unsqueeze(0)
        # Batches are joined along their first dimension, so the other dimensions must agree.
        if self.pending and self.pending[0].shape[1:] != inputs.shape[1:]:
            self.flush()
        self.module = module
        self.pending_positions += inputs.numel() // _position_size(module, inputs)
        if self.pending_positions >= self.chunk_positions:
            self.pending.append(inputs)
            self.flush()
        else:
            # A copy, since the model may change the tensor in place after this layer has run
            self.pending.append(inputs.clone())

    def flush(self):
        """Add the held-back inputs to the accumulator."""
        if not self.pending:
            return
        inputs = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending, self.pending_positions = [], 0
        self.accumulate(self.accumulator, self.module, inputs, self.max_patches_per_chunk)


def _position_size(module, inputs):
    """Return the number of input entries per position: channels of a pixel or features of a row."""
    return inputs.shape[1] if isinstance(module, torch.nn.Conv2d) else inputs.shape[-1]


def _chunk_positions(module, max_patches_per_chunk):
    """Return how many input positions of ``module`` make one chunk of its accumulation."""
    return max_patches_per_chunk * _chunk_scale(module)


def collect_input_statistics(
    model,
    data,
    layers=None,
    *,
    batch_size=None,
    device=None,
    progress=True,
    max_patches_per_chunk=4096,
    distributed=None,
):
    """Collect the second moment of the inputs of a model's layers over calibration data.

    Forward pre-hooks record the input of each selected layer while ``model`` runs on
    ``data`` in eval mode under :func:`torch.no_grad`. For a ``Conv2d`` the input vectors
    are the im2col patches of the layer's own kernel size, stride, padding (including
    ``'same'`` and ``'valid'``), padding mode and dilation. For a ``Linear`` they are the
    input rows, with all leading dimensions flattened. Sums are accumulated in float64.

    Parameters
    ----------
    model : torch.nn.Module
        Model to run. Its weights are not changed, and the train/eval mode of every
        submodule is restored on return, also after an error.
    data : torch.Tensor, torch.utils.data.DataLoader or iterable
        Calibration inputs: one tensor of inputs, split along its first dimension into
        batches of ``batch_size``, or an iterable of batches. A batch is an input tensor or
        a tuple/list whose first element is the input tensor (as a DataLoader over
        ``(inputs, targets)`` pairs yields).
    layers : iterable of str, optional
        Names (as in ``model.named_modules()``) of the ``nn.Conv2d`` and ``nn.Linear``
        layers to collect. By default every such layer.
    batch_size : int, optional
        Number of inputs per forward pass when ``data`` is a tensor; 64 by default. Must
        be None for any other ``data``, which sets its own batches.
    device : torch.device or str, optional
        Device the batches are moved to. By default the device of the model's first
        parameter or buffer. The model itself is not moved.
    progress : bool, default is True
        Whether to show a tqdm progress bar over the batches.
    max_patches_per_chunk : int, default is 4096
        Maximum number of patches (or rows) unfolded at once, which bounds the memory to
        about ``8 * max_patches_per_chunk * D`` bytes per layer (151 MB for a 512-channel
        3x3 convolution). A single output row of one image is never split. Stride-1
        convolutions whose products come from Fourier transforms hold at most that many
        bytes of image spectra, and up to 16 MB more for one block of frequencies.
    distributed : bool, optional
        Whether to combine the statistics of all processes of the default torch.distributed
        process group with :func:`tensorly_datc.nn.distributed.all_reduce_statistics`. Each
        process passes its own shard of the data as ``data``, for example through a
        :class:`~torch.utils.data.DistributedSampler`, and returns the statistics of the
        union of all shards. None (the default) combines them when a group of more than one
        process is initialised, True requires a group, False returns this process's shard
        alone. When combining, every process of the group must call this function with the
        same model and ``layers``.

    Returns
    -------
    dict of str to InputStatistics
        Statistics of each collected layer, in the order of ``model.named_modules()``, on
        the device where the layer received its inputs. Both the second moment and the
        mean are stored, so the centred metric is available as
        :attr:`InputStatistics.covariance`.

    Raises
    ------
    ValueError
        If a name in ``layers`` is not a module of ``model`` or not a Conv2d or Linear
        layer, if a layer's input contains NaN or inf (the message names the layer), or
        if ``batch_size`` is given for non-tensor ``data``.
    RuntimeError
        If ``distributed`` is True and no torch.distributed process group is initialised.

    Notes
    -----
    Grouped convolutions (``groups > 1``) are not collected. The logger
    ``tensorly_datc.nn.statistics`` names each one, at level WARNING when it was named in
    ``layers`` and INFO otherwise. Layers that never run during the pass (on any process, when
    the statistics are combined) are left out of the result, with a WARNING from the same
    logger (a log record, not a Python warning).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, kernel_size=3, padding=1),
    ...     torch.nn.Flatten(),
    ...     torch.nn.Linear(8 * 4 * 4, 10),
    ... )
    >>> statistics = collect_input_statistics(model, torch.randn(16, 3, 4, 4), progress=False)
    >>> statistics["0"]
    InputStatistics(n_features=27, count=256, device='cpu')
    >>> statistics["2"].second_moment.shape
    torch.Size([128, 128])
    """
    # Imported here because the distributed module builds on InputStatistics.
    from .distributed import all_reduce_statistics, resolve_distributed

    # Check arguments
    combine = resolve_distributed(distributed)
    check_module(model)
    if data is None:
        raise TypeError("data must be a tensor of inputs, a DataLoader or an iterable of batches; got None")
    max_patches_per_chunk = check_positive_int(max_patches_per_chunk, "max_patches_per_chunk")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    batch_size = _resolve_batch_size(data, batch_size)
    selected = _select_layers(model, layers)
    if device is None:
        device = _model_device(model)

    # Run the model with one accumulating hook per layer
    accumulators = {name: _MomentAccumulator() for name in selected}
    hooks = {
        module: _BufferedHook(
            name, accumulators[name], _accumulation_function(module), max_patches_per_chunk,
            _chunk_positions(module, max_patches_per_chunk),
        )
        for name, module in selected.items()
    }
    progress_bar = tqdm(
        _iterate_inputs(data, batch_size),
        total=_batch_count(data, batch_size),
        desc="Collecting input statistics",
        disable=not progress,
    )
    with progress_bar:
        _run_with_hooks(model, hooks, progress_bar, device)
    for hook in hooks.values():
        hook.flush()

    # Combine the shards of all processes, then leave out the layers that never ran
    statistics = {
        name: _layer_statistics(accumulators[name], module) for name, module in selected.items()
    }
    if combine:
        statistics = all_reduce_statistics(statistics)
    never_run = [name for name, layer in statistics.items() if layer.count == 0]
    if never_run:
        logger.warning("Layers %s received no input, so they are left out of the result", never_run)
    return {name: layer for name, layer in statistics.items() if layer.count > 0}


def _layer_statistics(accumulator, module):
    """Return the accumulated statistics, or zeros with count 0 if ``module`` never ran."""
    if accumulator.count > 0:
        return accumulator.to_statistics()
    # An input vector has one entry per weight of an output channel: in_channels * kh * kw
    # for a Conv2d, in_features for a Linear.
    n_features = module.weight[0].numel()
    second_moment = module.weight.new_zeros((n_features, n_features), dtype=torch.float64)
    return InputStatistics(second_moment, second_moment.new_zeros(n_features), 0)


def _resolve_batch_size(data, batch_size):
    """Return the batch size for tensor ``data`` (64 by default), or None for other data."""
    if isinstance(data, torch.Tensor):
        batch_size = 64 if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
        return batch_size
    if batch_size is not None:
        raise ValueError(
            f"batch_size applies only when data is a tensor; got data of type "
            f"{type(data).__name__}, which sets its own batches"
        )
    return None


def _model_device(model):
    """Return the device of the model's first parameter or buffer, or None if it has none."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _run_with_hooks(model, hooks, batches, device):
    """Run ``model`` on ``batches`` in eval mode, without gradients, with forward pre-hooks.

    ``hooks`` maps modules to their hook. The hooks are removed and the train/eval mode of
    every submodule is restored afterwards, also when the forward raises.
    """
    handles = []
    training_modes = {module: module.training for module in model.modules()}
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for inputs in batches:
                model(inputs if device is None else inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training


def _checksum(layers_json, tensors):
    """Return the SHA-256 hex digest of the layer list and the tensors' bytes, in order."""
    digest = hashlib.sha256(layers_json.encode("utf-8"))
    for key, tensor in tensors.items():
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}".encode("utf-8"))
        digest.update(tensor.numpy())
    return digest.hexdigest()


def _tensor_keys(name):
    return f"{name}.second_moment", f"{name}.mean"


def save_statistics(statistics, path):
    """Save a mapping of layer names to InputStatistics to a safetensors file.

    The tensors are stored under ``"<layer name>.second_moment"`` and
    ``"<layer name>.mean"``. The metadata stores the layer names and counts, and a
    SHA-256 checksum that :func:`load_statistics` verifies. The file is written to a
    temporary name first and then renamed, so an interrupted save leaves no partial file
    at ``path``.

    Parameters
    ----------
    statistics : mapping of str to InputStatistics
        Statistics to save, as returned by :func:`collect_input_statistics`.
    path : str or os.PathLike
        File to write; an existing file is replaced.
    """
    if not isinstance(statistics, Mapping):
        raise TypeError(
            f"statistics must be a mapping of layer names to InputStatistics; got {type(statistics).__name__}"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save statistics to {path}: folder {path.parent} does not exist")
    counts = {}
    tensors = {}
    for name, layer_statistics in statistics.items():
        if not isinstance(layer_statistics, InputStatistics):
            raise TypeError(
                f"statistics[{name!r}] must be an InputStatistics; "
                f"got {type(layer_statistics).__name__}"
            )
        second_moment_key, mean_key = _tensor_keys(name)
        tensors[second_moment_key] = layer_statistics.second_moment.detach().cpu().contiguous()
        tensors[mean_key] = layer_statistics.mean.detach().cpu().contiguous()
        counts[name] = layer_statistics.count

    layers_json = json.dumps(counts)
    metadata = {
        "format": _FILE_FORMAT,
        "layers": layers_json,
        "sha256": _checksum(layers_json, tensors),
    }
    temporary_path = path.with_name(path.name + ".partial")
    save_file(tensors, temporary_path, metadata=metadata)
    os.replace(temporary_path, path)


def load_statistics(path):
    """Load a mapping of layer names to InputStatistics saved by :func:`save_statistics`.

    Loading executes no code from the file. The statistics are loaded on the CPU.

    Parameters
    ----------
    path : str or os.PathLike
        File written by :func:`save_statistics`.

    Returns
    -------
    dict of str to InputStatistics
        The saved statistics, in the order they were saved.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a valid safetensors file, was not written by
        :func:`save_statistics`, or fails its checksum (truncated or modified).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input statistics file not found: {path}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"invalid input statistics file {path}: {error}") from error
    if metadata.get("format") != _FILE_FORMAT:
        raise ValueError(
            f"invalid input statistics file {path}: metadata format is "
            f"{metadata.get('format')!r}, expected {_FILE_FORMAT!r}"
        )

    # Verify the checksum before trusting the layer list
    layers_json = metadata.get("layers", "")
    try:
        counts = json.loads(layers_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid input statistics file {path}: unreadable layer list") from error
    keys = [key for name in counts for key in _tensor_keys(name)]
    if sorted(keys) != sorted(tensors):
        raise ValueError(
            f"invalid input statistics file {path}: tensors do not match the layer list"
        )
    ordered = {key: tensors[key] for key in keys}
    if _checksum(layers_json, ordered) != metadata.get("sha256"):
        raise ValueError(
            f"invalid input statistics file {path}: checksum mismatch, the file was modified "
            "or corrupted"
        )

    statistics = {}
    for name, count in counts.items():
        second_moment_key, mean_key = _tensor_keys(name)
        try:
            statistics[name] = InputStatistics(ordered[second_moment_key], ordered[mean_key], count)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"invalid input statistics file {path}, layer {name}: {error}"
            ) from error
    return statistics
