"""Correlations of feature maps at small shifts, through the discrete Fourier transform.

The second moment of a stride-1 convolution's patches is made of the blocks
``sum_z x[z] x[z + s]^T``, summed over the pixels ``z`` of each image, one for each shift ``s``
between two kernel taps. Formed directly, each shift costs a ``C x C`` product over every
pixel. The Fourier transform gives every shift at once. With ``X(f)`` the 2-D transform of an
image zero-padded to ``Hf x Wf`` pixels, at least its size plus the largest shift so that no
shift wraps around,

.. math::

    \\sum_z x[z] x[z + s]^T = \\frac{1}{H_f W_f} \\sum_f \\overline{X(f)} X(f)^T e^{2 \\pi i
    (f_1 s_1 / H_f + f_2 s_2 / W_f)}.

The cross-spectra ``sum_n conj(X_n(f)) X_n(f)^T`` over the images cost about three real
``C x C`` products per image and frequency. Directly, each image, pixel and shift costs one. For
a 3x3 kernel on 56x56 maps that is 5,580 against 40,768 products of ``C x C`` per image.
"""

import math

import scipy.fft
import torch


def fourier_shape(height, width, shifts):
    """Return the (Hf, Wf) transform size for images of ``height x width`` and ``shifts``.

    Each side is the smallest length at least the image side plus the largest shift along it
    that the FFT handles fast (:func:`scipy.fft.next_fast_len`).
    """
    reach_height = max(abs(shift[0]) for shift in shifts)
    reach_width = max(abs(shift[1]) for shift in shifts)
    return (
        scipy.fft.next_fast_len(height + reach_height, real=True),
        scipy.fft.next_fast_len(width + reach_width, real=True),
    )


def spectrum_size(fourier_height, fourier_width):
    """Return the number of frequencies of a real transform of ``fourier_height x fourier_width``."""
    return fourier_height * (fourier_width // 2 + 1)


def direct_cost(height, width, shifts):
    """Return the number of ``C x C`` products per image that forming ``shifts`` directly costs."""
    return sum(max(0, height - abs(rows)) * max(0, width - abs(columns)) for rows, columns in shifts)


def spectral_cost(height, width, shifts):
    """Return the number of ``C x C`` products per image that the cross-spectra cost."""
    return 3 * spectrum_size(*fourier_shape(height, width, shifts))


def _phase_tables(shifts, fourier_height, fourier_width, like):
    """Return the (S, F) weights of the real and imaginary cross-spectra for each shift.

    A real transform keeps the frequencies of columns ``0 .. Wf // 2``. The others are the
    complex conjugates of kept ones, so each kept column counts twice except column 0 and,
    for an even ``Wf``, column ``Wf / 2``.
    """
    n_columns = fourier_width // 2 + 1
    rows = torch.arange(fourier_height, dtype=torch.float64).repeat_interleave(n_columns)
    columns = torch.arange(n_columns, dtype=torch.float64).repeat(fourier_height)
    counted_once = (columns == 0) | ((fourier_width % 2 == 0) & (columns == fourier_width // 2))
    weights = (2.0 - counted_once.to(torch.float64)) / (fourier_height * fourier_width)
    shift_rows = torch.tensor([float(shift[0]) for shift in shifts], dtype=torch.float64)
    shift_columns = torch.tensor([float(shift[1]) for shift in shifts], dtype=torch.float64)
    angles = 2 * math.pi * (
        shift_rows[:, None] * rows / fourier_height + shift_columns[:, None] * columns / fourier_width
    )
    cosines = (weights * torch.cos(angles)).to(device=like.device, dtype=like.dtype)
    sines = (weights * torch.sin(angles)).to(device=like.device, dtype=like.dtype)
    return cosines, sines


def shift_correlations(images, shifts, block_bytes):
    """Return ``sum_n sum_z x_n[z] x_n[z + s]^T`` for each shift ``s``, with ``x_n`` zero
    outside its image.

    Parameters
    ----------
    images : torch.Tensor
        Float32 or float64 images of shape (N, C, H, W), on any device.
    shifts : list of (int, int)
        Shifts ``s`` as (rows, columns).
    block_bytes : int
        Memory for one block of frequencies: their real and imaginary parts and their two
        ``C x C`` cross-spectra. Blocks hold at least one frequency.

    Returns
    -------
    torch.Tensor
        Shape (len(shifts), C, C), in the dtype of ``images``. Float32 transforms are accurate
        to about 1e-6 of the largest diagonal entry, as float32 products over the pixels are.
    """
    n_images, n_channels, height, width = images.shape
    fourier_height, fourier_width = fourier_shape(height, width, shifts)
    spectra = torch.fft.rfft2(images, s=(fourier_height, fourier_width)).reshape(n_images, n_channels, -1)
    n_frequencies = spectra.shape[-1]
    cosines, sines = _phase_tables(shifts, fourier_height, fourier_width, images)
    real_sums = images.new_zeros((len(shifts), n_channels * n_channels))
    mixed_sums = images.new_zeros((len(shifts), n_channels * n_channels))

    # Sum the cross-spectra block by block, weighted by the phase of each shift
    bytes_per_frequency = images.element_size() * 2 * (n_images * n_channels + n_channels * n_channels)
    block = max(1, block_bytes // bytes_per_frequency)
    for start in range(0, n_frequencies, block):
        stop = min(start + block, n_frequencies)
        # (N, C, f, 2) -> (f, 2N, C): each frequency's rows are the real parts of the images,
        # then their imaginary parts
        parts = torch.view_as_real(spectra[:, :, start:stop]).permute(2, 3, 0, 1).reshape(stop - start, -1, n_channels)
        # Re sum_n conj(X_n) X_n^T = sum_n Re Re^T + Im Im^T
        real = torch.bmm(parts.transpose(1, 2), parts)
        # Im sum_n conj(X_n) X_n^T = M - M^T with M = sum_n Re Im^T
        mixed = torch.bmm(parts[:, :n_images].transpose(1, 2), parts[:, n_images:])
        real_sums.addmm_(cosines[:, start:stop], real.view(stop - start, -1))
        mixed_sums.addmm_(sines[:, start:stop], mixed.view(stop - start, -1))

    # Re(S e^{i theta}) = Re(S) cos(theta) - Im(S) sin(theta)
    real_sums = real_sums.view(len(shifts), n_channels, n_channels)
    mixed_sums = mixed_sums.view(len(shifts), n_channels, n_channels)
    return real_sums - mixed_sums + mixed_sums.transpose(1, 2)
