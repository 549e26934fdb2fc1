"""Patch moments of zero-padded convolutions from products of shifted pixels.

Every block of kernel taps ``(t, u)`` of a convolution's patch moment is a sum of products of
the input pixels that the two taps read, which lie a fixed shift apart. Tap pairs with the
same shift share one product over their pixels, corrected by a few border strips, so no
patch is ever unfolded.
"""

import math

import torch

from ._spectra import shift_correlations


def _prepare_sums(accumulator, n_features, like):
    """Create the accumulator's float64 sums on the device of ``like`` if it has none yet."""
    if accumulator.sum_outer is None:
        accumulator.sum_outer = like.new_zeros((n_features, n_features), dtype=torch.float64)
    if accumulator.sum is None:
        accumulator.sum = like.new_zeros(n_features, dtype=torch.float64)


def _clipped_range(band, offset, shift, size, partner_size):
    """Return the range [lo, hi) of pixels that a tap at ``offset`` reads for the output
    ``band``, clipped to its image of ``size`` pixels and to the pixels whose partner ``shift``
    away lies inside an image of ``partner_size`` pixels."""
    return max(band[0] + offset, 0, -shift), min(band[1] + offset, size, partner_size - shift)


class _ShiftGeometry:
    """Positions in phase images that the kernel taps of a zero-padded convolution read.

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

    With ``block_bytes``, the band is every output row of a stride-1 convolution. Each
    group's product over all pixels whose partner lies in the image then comes from the
    images' Fourier transforms (see :func:`._spectra.shift_correlations`), with at most
    ``block_bytes`` per block of frequencies. The strips are still direct products.
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
        else:
            rows, columns = geometry.support(key)
        for t, u, pair_rows, pair_columns in pairs:
            # Strips larger than the pair's own rectangle would cancel most of the product, which
            # costs accuracy in float32 and time, so such a pair takes its own product.
            if 2 * _area(pair_rows, pair_columns) < _area(rows, columns):
                block = products.sum(key, pair_rows, pair_columns)
            else:
                whole = products.sum(key, rows, columns) if block_bytes is None else correlations[key[2]]
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


def _area(rows, columns):
    """Return the number of pixels of the rectangle ``rows x columns``."""
    return (rows[1] - rows[0]) * (columns[1] - columns[0])


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
