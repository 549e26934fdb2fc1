"""Tests of the shift correlations that stride-1 convolutions take from Fourier transforms."""

import pytest

torch = pytest.importorskip("torch")

from tensorly_datc.nn._spectra import (  # noqa: E402
    direct_cost,
    fourier_shape,
    shift_correlations,
    spectral_cost,
)

# Shifts of the half-plane rows > 0 or (rows = 0 and columns >= 0), up to 3 pixels
SHIFTS = [(rows, columns) for rows in range(4) for columns in range(-3, 4) if rows > 0 or columns >= 0]


def _reference_correlation(images, shift):
    """Return sum_n sum_z x_n[z] x_n[z + shift]^T with explicit loops over the pixels."""
    n_images, n_channels, height, width = images.shape
    total = torch.zeros(n_channels, n_channels, dtype=torch.float64)
    for row in range(height):
        for column in range(width):
            partner_row, partner_column = row + shift[0], column + shift[1]
            if 0 <= partner_row < height and 0 <= partner_column < width:
                total += images[:, :, row, column].T @ images[:, :, partner_row, partner_column]
    return total


# Odd and even transform sides (the column of frequency Wf / 2 counts once), images smaller
# than the shifts, and a single pixel
@pytest.mark.parametrize("shape", [(2, 3, 7, 6), (3, 4, 2, 9), (2, 2, 5, 5), (1, 5, 1, 1)], ids=str)
@pytest.mark.parametrize("block_bytes", [1, 10**9], ids=["one frequency per block", "one block"])
def test_correlations_match_brute_force(shape, block_bytes):
    torch.manual_seed(0)
    images = torch.randn(*shape, dtype=torch.float64)

    correlations = shift_correlations(images, SHIFTS, block_bytes)

    assert correlations.shape == (len(SHIFTS), shape[1], shape[1])
    for shift, correlation in zip(SHIFTS, correlations):
        # Float64 transforms: only rounding separates the two sums.
        torch.testing.assert_close(correlation, _reference_correlation(images, shift), rtol=1e-10, atol=1e-10)


def test_float32_correlations_accuracy():
    torch.manual_seed(1)
    images = torch.randn(4, 16, 12, 10)

    correlations = shift_correlations(images, SHIFTS, 10**9)

    assert correlations.dtype == torch.float32
    # Float32 transforms err by about 1e-7 of the largest entry per operation, over a few
    # hundred terms.
    scale = _reference_correlation(images.double(), (0, 0)).diagonal().max()
    for shift, correlation in zip(SHIFTS, correlations):
        error = (correlation.double() - _reference_correlation(images.double(), shift)).abs().max()
        assert error <= 1e-5 * scale


def test_inputs_unmodified():
    torch.manual_seed(2)
    images = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    copy = images.clone()

    shift_correlations(images, SHIFTS, 1)

    assert torch.equal(images, copy)


def test_fourier_shape_avoids_wrap_around():
    # Each side covers the image plus the largest shift along it, rounded up to a fast length.
    assert fourier_shape(56, 56, [(0, 0), (2, -2)]) == (60, 60)
    assert fourier_shape(7, 7, [(0, 0), (2, 1)]) == (9, 8)
    height, width = fourier_shape(13, 5, [(0, 3), (1, -4)])
    assert height >= 14
    assert width >= 9


def test_costs_count_products():
    # A 3x3 kernel's 13 shifts: one product per pixel whose partner lies in the map
    shifts = [(0, 0), (0, 1), (0, 2)] + [(rows, columns) for rows in (1, 2) for columns in range(-2, 3)]
    height, width = 6, 5
    pairs = sum(
        1
        for rows, columns in shifts
        for row in range(height)
        for column in range(width)
        if 0 <= row + rows < height and 0 <= column + columns < width
    )
    assert direct_cost(height, width, shifts) == pairs
    # Three real products for each of the 60 x 31 frequencies of a real 60x60 transform
    assert spectral_cost(56, 56, shifts) == 3 * 60 * 31
    # Shifts longer than the image reach no pixel.
    assert direct_cost(2, 2, [(3, 0), (0, 2)]) == 0
