"""Tests of the input statistics collected for the metric of each layer."""

import logging
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from tensorly_datc.nn import (  # noqa: E402
    InputStatistics,
    collect_input_statistics,
    load_statistics,
    save_statistics,
)
from tensorly_datc.nn import _conv_moments as conv_moments  # noqa: E402
from tensorly_datc.nn import _shifted_products as shifted_products  # noqa: E402

# Every quantity is float64 and the sums run over a few hundred patches, so only
# rounding (about 1e-16 relative per operation) separates the two computations.
TOL = 1e-10
# Float32 inputs have their chunk products formed in float32 before the float64 sums, which
# is accurate to about 1e-7 relative for these few rows.
FLOAT32_TOL = 1e-5


def _padded_index(index, size, before, mode):
    """Return the input index read at padded position ``index``, or None for a zero."""
    shifted = index - before
    if 0 <= shifted < size:
        return shifted
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(shifted, 0), size - 1)
    if mode == "circular":
        return shifted % size
    # reflect: mirror about the first and last element, without repeating them
    return -shifted if shifted < 0 else 2 * (size - 1) - shifted


def _reference_padding(kernel_size, padding, dilation):
    """Return ((top, bottom), (left, right)) padding, computed from Conv2d's documented rules."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        return tuple((total // 2, total - total // 2) for total in totals)
    return tuple((p, p) for p in padding)


def _reference_conv_patches(conv, inputs):
    """Return the (P, D) im2col patches of ``conv`` on ``inputs`` built with explicit loops."""
    inputs = inputs.to(torch.float64).numpy()
    n_images, n_channels, height, width = inputs.shape
    (kernel_height, kernel_width), (stride_height, stride_width) = conv.kernel_size, conv.stride
    dilation_height, dilation_width = conv.dilation
    (top, bottom), (left, right) = _reference_padding(conv.kernel_size, conv.padding, conv.dilation)
    span_height = dilation_height * (kernel_height - 1) + 1
    span_width = dilation_width * (kernel_width - 1) + 1
    out_height = (height + top + bottom - span_height) // stride_height + 1
    out_width = (width + left + right - span_width) // stride_width + 1

    patches = []
    for image in range(n_images):
        for out_row in range(out_height):
            for out_col in range(out_width):
                patch = np.zeros((n_channels, kernel_height, kernel_width))
                for i in range(kernel_height):
                    for j in range(kernel_width):
                        row = out_row * stride_height + i * dilation_height
                        col = out_col * stride_width + j * dilation_width
                        row = _padded_index(row, height, top, conv.padding_mode)
                        col = _padded_index(col, width, left, conv.padding_mode)
                        if row is not None and col is not None:
                            patch[:, i, j] = inputs[image, :, row, col]
                patches.append(patch.reshape(-1))
    return torch.from_numpy(np.stack(patches))


def _assert_matches_rows(statistics, rows, tol=TOL):
    """Assert that ``statistics`` are the moments of the rows of ``rows`` (P, D)."""
    assert statistics.count == rows.shape[0]
    assert statistics.second_moment.dtype == torch.float64
    second_moment = rows.T @ rows / rows.shape[0]
    torch.testing.assert_close(statistics.second_moment, second_moment, rtol=tol, atol=tol)
    torch.testing.assert_close(statistics.mean, rows.mean(dim=0), rtol=tol, atol=tol)


CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"),
    dict(kernel_size=(3, 5), padding=(2, 1), padding_mode="replicate"),
    dict(kernel_size=(3, 5), padding=(1, 3), padding_mode="circular"),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(0, 1), padding_mode="reflect"),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=(2, 3), dilation=(2, 1), padding=1, padding_mode="circular"),
    dict(kernel_size=(4, 2), padding="same"),
    dict(kernel_size=(4, 2), dilation=(1, 2), padding="same", padding_mode="reflect"),
    dict(kernel_size=(2, 3), padding="same", padding_mode="replicate"),
    dict(kernel_size=3, padding="same", padding_mode="circular"),
    dict(kernel_size=(3, 5), padding="valid"),
    dict(kernel_size=1),
    # Zero padding wider than the kernel: some taps read only padding on the border rows.
    dict(kernel_size=3, padding=3),
    dict(kernel_size=(1, 3), padding=(2, 0), dilation=(1, 2)),
    # Strides that split the input into phase images of different sizes
    dict(kernel_size=(3, 4), stride=(2, 3), padding=(2, 1), dilation=(1, 2)),
    dict(kernel_size=5, stride=3, padding=2),
    dict(kernel_size=1, stride=2),
]


@pytest.fixture(params=["unfolded", "shifted", "spectral"])
def conv_route(request, monkeypatch):
    """Run the test on three routes, whatever the number of channels. First every convolution
    unfolds its patches. Then every zero-padded one forms them from shifted pixels by direct
    products, and last by Fourier transforms for stride 1 wherever a chunk takes whole images."""
    threshold = 10**9 if request.param == "unfolded" else 1
    monkeypatch.setattr(conv_moments, "_MIN_SHIFTED_CHANNELS", threshold)
    saving = 0 if request.param == "spectral" else math.inf
    monkeypatch.setattr(conv_moments, "_MIN_SPECTRAL_SAVING", saving)
    return request.param


# torch warns that an even kernel with padding="same" makes it copy the input.
SAME_PADDING_WARNING = "ignore:Using padding='same' with even kernel:UserWarning"


@pytest.mark.filterwarnings(SAME_PADDING_WARNING)
@pytest.mark.parametrize("options", CONV_CASES, ids=str)
def test_conv_matches_brute_force(options, conv_route):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **options).double()
    inputs = torch.randn(3, 2, 7, 6, dtype=torch.float64)

    statistics = collect_input_statistics(conv, inputs, progress=False)

    assert list(statistics) == [""]
    _assert_matches_rows(statistics[""], _reference_conv_patches(conv, inputs))


@pytest.mark.filterwarnings(SAME_PADDING_WARNING)
@pytest.mark.parametrize("options", CONV_CASES, ids=str)
def test_conv_metric_predicts_output_moments(options, conv_route):
    # With zero bias, E[y y^T] over output positions is W_mat Sigma W_mat^T exactly, so
    # this checks the patch order and the padding against the layer's own forward.
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, bias=False, **options).double()
    inputs = torch.randn(2, 2, 8, 7, dtype=torch.float64)

    statistics = collect_input_statistics(conv, inputs, progress=False)[""]

    outputs = conv(inputs).permute(0, 2, 3, 1).reshape(-1, 4)
    weight = conv.weight.detach().reshape(4, -1)
    assert statistics.count == outputs.shape[0]
    torch.testing.assert_close(
        weight @ statistics.second_moment @ weight.T,
        outputs.T @ outputs / outputs.shape[0],
        rtol=TOL,
        atol=TOL,
    )
    torch.testing.assert_close(weight @ statistics.mean, outputs.mean(dim=0), rtol=TOL, atol=TOL)


def test_linear_flattens_leading_dimensions():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    inputs = torch.randn(6, 3, 2, 5)

    statistics = collect_input_statistics(model, inputs, batch_size=4, progress=False)

    assert list(statistics) == ["0", "2"]
    _assert_matches_rows(statistics["0"], inputs.reshape(-1, 5).double(), FLOAT32_TOL)
    hidden = torch.tanh(model[0](inputs)).reshape(-1, 4).double()
    _assert_matches_rows(statistics["2"], hidden, FLOAT32_TOL)


def test_unbatched_conv_input():
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1).double()
    inputs = torch.randn(2, 5, 5, dtype=torch.float64)

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x[0])

    statistics = collect_input_statistics(Unbatched(), inputs[None], progress=False)

    _assert_matches_rows(statistics["conv"], _reference_conv_patches(conv, inputs[None]))


def test_input_passed_by_keyword():
    class KeywordCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(input=x)

    inputs = torch.randn(5, 3)

    statistics = collect_input_statistics(KeywordCall(), inputs, progress=False)

    _assert_matches_rows(statistics["linear"], inputs.double(), FLOAT32_TOL)


def _small_cnn():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, kernel_size=(3, 5), stride=2, padding="valid"),
        nn.Flatten(),
        nn.Linear(4 * 2 * 1, 5),
    )


def _assert_same_statistics(result, expected, tol=TOL):
    assert list(result) == list(expected)
    for name in expected:
        assert result[name].count == expected[name].count
        torch.testing.assert_close(
            result[name].second_moment, expected[name].second_moment, rtol=tol, atol=tol
        )
        torch.testing.assert_close(result[name].mean, expected[name].mean, rtol=tol, atol=tol)


def test_data_forms_agree():
    model = _small_cnn()
    inputs = torch.randn(10, 3, 6, 6)
    targets = torch.arange(10)

    from_tensor = collect_input_statistics(model, inputs, batch_size=4, progress=False)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)
    from_loader = collect_input_statistics(model, loader, progress=False)
    pairs = [(inputs[i : i + 4], targets[i : i + 4]) for i in range(0, 10, 4)]
    from_pairs = collect_input_statistics(model, pairs, progress=False)
    from_generator = collect_input_statistics(model, (x for x, _ in pairs), progress=False)

    assert list(from_tensor) == ["0", "2", "4"]
    _assert_same_statistics(from_loader, from_tensor)
    _assert_same_statistics(from_pairs, from_tensor)
    _assert_same_statistics(from_generator, from_tensor)


@pytest.mark.parametrize("max_patches_per_chunk", [1, 5, 40, 100_000])
def test_chunking_keeps_result(max_patches_per_chunk, conv_route):
    # 1 and 5 split single images into bands of output rows, 40 groups whole images.
    model = _small_cnn().double()
    inputs = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    expected = collect_input_statistics(model, inputs, progress=False, max_patches_per_chunk=10**9)

    result = collect_input_statistics(
        model, inputs, progress=False, max_patches_per_chunk=max_patches_per_chunk
    )

    _assert_same_statistics(result, expected)


@pytest.mark.parametrize("max_patches_per_chunk", [1, 7, 100_000])
@pytest.mark.parametrize("options", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), padding=(2, 1), dilation=2),
                                     dict(kernel_size=3, stride=2, padding=1)],
                         ids=str)
def test_banded_conv_matches_brute_force(options, max_patches_per_chunk, conv_route):
    # Bands of a few output rows leave some taps of a band reading padding only.
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 2, **options).double()
    inputs = torch.randn(2, 3, 9, 5, dtype=torch.float64)

    statistics = collect_input_statistics(
        conv, inputs, progress=False, max_patches_per_chunk=max_patches_per_chunk
    )[""]

    _assert_matches_rows(statistics, _reference_conv_patches(conv, inputs))


@pytest.mark.parametrize("max_held_bytes", [0, 2**30], ids=["added each chunk", "held"])
def test_many_chunks_match_brute_force(max_held_bytes, monkeypatch):
    # One output row per chunk and a flush every 3 chunks: the tap blocks of a layer are held
    # back, added, and held again, or added chunk by chunk when they may not be held.
    monkeypatch.setattr(shifted_products, "_TAP_BLOCK_CHUNKS", 3)
    monkeypatch.setattr(shifted_products, "_MAX_HELD_BYTES", max_held_bytes)
    torch.manual_seed(8)
    conv = nn.Conv2d(16, 2, kernel_size=3, padding=1).double()
    inputs = torch.randn(2, 16, 8, 5, dtype=torch.float64)

    statistics = collect_input_statistics(conv, inputs, progress=False, max_patches_per_chunk=1)[""]

    _assert_matches_rows(statistics, _reference_conv_patches(conv, inputs))


def test_patches_of_padding_only():
    # A 1x1 kernel with stride 2 on a 1x1 image reads only the zero padding around the pixel,
    # so the shifted products of every chunk are empty.
    conv = nn.Conv2d(16, 2, kernel_size=1, stride=2, padding=1).double()
    inputs = torch.randn(3, 16, 1, 1, dtype=torch.float64)

    statistics = collect_input_statistics(conv, inputs, progress=False)[""]

    _assert_matches_rows(statistics, _reference_conv_patches(conv, inputs))


@pytest.mark.parametrize("stride", [1, 2])
def test_wide_zero_padded_conv_never_unfolds(stride, monkeypatch):
    # With the default threshold, a 16-channel zero-padded convolution takes the shifted route.
    def fail_on_unfold(*args):
        raise AssertionError("the patches were unfolded")

    monkeypatch.setattr(conv_moments, "_add_unfolded_patches", fail_on_unfold)
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 2, kernel_size=3, stride=stride, padding=1).double()
    inputs = torch.randn(2, 16, 7, 6, dtype=torch.float64)

    statistics = collect_input_statistics(conv, inputs, progress=False)[""]

    _assert_matches_rows(statistics, _reference_conv_patches(conv, inputs))


def test_float32_conv_statistics_match_float64_reference(conv_route):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 2, kernel_size=3, padding=1)
    inputs = torch.randn(2, 4, 6, 6)

    statistics = collect_input_statistics(conv, inputs, progress=False)[""]

    rows = _reference_conv_patches(conv.double(), inputs.double())
    _assert_matches_rows(statistics, rows, tol=1e-5)


class _ClobbersItsInput(nn.Module):
    """Convolution whose input tensor is zeroed in place after the layer has run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)

    def forward(self, inputs):
        inputs = inputs * 1.0
        outputs = self.conv(inputs)
        inputs.zero_()
        return outputs


def test_held_back_inputs_survive_in_place_changes(conv_route):
    # Batches of 2 images of 4x4 pixels fill no chunk, so their inputs are held back while
    # the model zeroes them.
    torch.manual_seed(4)
    model = _ClobbersItsInput().double()
    inputs = torch.randn(6, 2, 4, 4, dtype=torch.float64)

    statistics = collect_input_statistics(model, inputs, batch_size=2, progress=False)

    _assert_matches_rows(statistics["conv"], _reference_conv_patches(model.conv, inputs))


def test_batches_of_different_sizes_match_brute_force(conv_route):
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1).double()
    batches = [torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.randn(1, 2, 5, 7, dtype=torch.float64),
               torch.randn(3, 2, 5, 7, dtype=torch.float64)]

    statistics = collect_input_statistics(conv, batches, progress=False)[""]

    rows = torch.cat([_reference_conv_patches(conv, batch) for batch in batches])
    _assert_matches_rows(statistics, rows)


def test_many_small_linear_batches_match_brute_force():
    torch.manual_seed(6)
    layer = nn.Linear(7, 2).double()
    inputs = torch.randn(50, 7, dtype=torch.float64)

    statistics = collect_input_statistics(layer, inputs, batch_size=3, progress=False)[""]

    _assert_matches_rows(statistics, inputs)


def test_merge_of_halves_equals_whole():
    model = _small_cnn().double()
    inputs = torch.randn(9, 3, 6, 6, dtype=torch.float64)
    whole = collect_input_statistics(model, inputs, progress=False)

    first = collect_input_statistics(model, inputs[:2], progress=False)
    second = collect_input_statistics(model, inputs[2:], progress=False)
    merged = {name: first[name] + second[name] for name in first}

    _assert_same_statistics(merged, whole)
    assert sum([first["0"], second["0"]]).count == whole["0"].count


def test_merge_weights_by_count():
    first = InputStatistics(torch.eye(2), torch.ones(2), 3)
    second = InputStatistics(2 * torch.eye(2), torch.zeros(2), 1)

    merged = first + second

    assert merged.count == 4
    torch.testing.assert_close(merged.second_moment, 1.25 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(merged.mean, torch.full((2,), 0.75, dtype=torch.float64))
    torch.testing.assert_close(first.second_moment, torch.eye(2, dtype=torch.float64))
    assert first.count == 3


def test_merge_rejects_different_sizes():
    first = InputStatistics(torch.eye(2), torch.zeros(2), 1)
    second = InputStatistics(torch.eye(3), torch.zeros(3), 1)

    with pytest.raises(ValueError, match="2 and 3 features"):
        first + second


def test_merge_with_empty_statistics():
    stats = InputStatistics(torch.eye(2), torch.ones(2), 5)
    empty = InputStatistics(torch.zeros(2, 2), torch.zeros(2), 0)

    merged = stats + empty

    assert merged.count == 5
    torch.testing.assert_close(merged.second_moment, stats.second_moment)
    assert (empty + empty).count == 0


def test_constructor_validates_shapes():
    with pytest.raises(ValueError, match="square"):
        InputStatistics(torch.zeros(2, 3), torch.zeros(2), 1)
    with pytest.raises(ValueError, match=r"mean must have shape \(2,\)"):
        InputStatistics(torch.zeros(2, 2), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="non-negative"):
        InputStatistics(torch.zeros(2, 2), torch.zeros(2), -1)


def _random_statistics():
    rows = torch.randn(20, 3, dtype=torch.float64)
    return rows, InputStatistics(rows.T @ rows / 20, rows.mean(0), 20)


def test_covariance_is_centred():
    rows, stats = _random_statistics()

    centred = rows - rows.mean(0)
    torch.testing.assert_close(stats.covariance, centred.T @ centred / 20, rtol=TOL, atol=TOL)


def test_repr_shows_size_and_count():
    _, stats = _random_statistics()

    assert repr(stats) == "InputStatistics(n_features=3, count=20, device='cpu')"


def test_to_moves_moments():
    _, stats = _random_statistics()

    moved = stats.to("meta")

    assert stats.to("cpu") is stats
    assert moved.device.type == "meta"
    assert moved.mean.device.type == "meta"
    assert moved.count == 20
    assert stats.device.type == "cpu"


def test_save_load_round_trip(tmp_path):
    model = _small_cnn()
    statistics = collect_input_statistics(model, torch.randn(4, 3, 6, 6), progress=False)
    statistics["odd.name.mean"] = InputStatistics(torch.eye(2), torch.ones(2), 2**40)
    path = tmp_path / "statistics.safetensors"

    save_statistics(statistics, path)
    loaded = load_statistics(path)

    assert list(loaded) == list(statistics)
    for name, stats in statistics.items():
        assert loaded[name].count == stats.count
        assert torch.equal(loaded[name].second_moment, stats.second_moment)
        assert torch.equal(loaded[name].mean, stats.mean)
    assert not (tmp_path / "statistics.safetensors.partial").exists()


def test_load_rejects_damaged_files(tmp_path):
    path = tmp_path / "statistics.safetensors"
    save_statistics({"conv": InputStatistics(torch.eye(3), torch.ones(3), 7)}, path)
    content = path.read_bytes()

    # Flip one byte of the tensor data, which the safetensors format itself cannot detect.
    tampered = bytearray(content)
    tampered[-3] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="checksum") as error:
        load_statistics(path)
    assert str(path) in str(error.value)

    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match="invalid input statistics file") as error:
        load_statistics(path)
    assert str(path) in str(error.value)

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_statistics(missing)


def test_load_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, path)

    with pytest.raises(ValueError, match="metadata format"):
        load_statistics(path)


def test_unknown_layer_name():
    with pytest.raises(ValueError, match=r"not found in the model: \['conv9'\]; its Conv2d and Linear "
                                         r"layers are '0', '2', '4'$"):
        collect_input_statistics(_small_cnn(), torch.randn(2, 3, 6, 6), layers=["0", "conv9"])


def test_unknown_layer_name_lists_ten_layers():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])

    with pytest.raises(ValueError, match=r"layers are '0', '1', .*, '9' and 2 more$"):
        collect_input_statistics(model, torch.randn(2, 2), layers=["x"])


def test_layer_of_unsupported_type():
    with pytest.raises(ValueError, match=r"1 \(ReLU\)"):
        collect_input_statistics(_small_cnn(), torch.randn(2, 3, 6, 6), layers=["1"])


def test_selected_layers_only():
    statistics = collect_input_statistics(
        _small_cnn(), torch.randn(2, 3, 6, 6), layers=["4", "0"], progress=False
    )

    assert sorted(statistics) == ["0", "4"]


def test_grouped_conv_skipped(caplog):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))

    with caplog.at_level(logging.INFO, logger="tensorly_datc.nn.statistics"):
        statistics = collect_input_statistics(model, torch.randn(2, 4, 5, 5), progress=False)

    assert list(statistics) == ["1"]
    records = [(record.levelno, record.getMessage()) for record in caplog.records]
    assert (logging.INFO, "Skipping layer 0: grouped convolution (groups=2)") in records


def test_named_grouped_conv_skipped_with_warning(caplog):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))

    with caplog.at_level(logging.WARNING, logger="tensorly_datc.nn.statistics"):
        statistics = collect_input_statistics(model, torch.randn(2, 4, 5, 5), layers=["0"], progress=False)

    assert statistics == {}
    records = [(record.levelno, record.getMessage()) for record in caplog.records]
    assert (logging.WARNING, "Skipping layer 0: grouped convolution (groups=2)") in records


def test_layer_never_run_left_out(caplog):
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    model.forward = lambda x: model["used"](x)

    with caplog.at_level(logging.WARNING, logger="tensorly_datc.nn.statistics"):
        statistics = collect_input_statistics(model, torch.randn(4, 3), progress=False)

    assert list(statistics) == ["used"]
    assert any("unused" in record.getMessage() for record in caplog.records)


def _assert_no_hooks(model):
    for module in model.modules():
        assert not module._forward_pre_hooks


class _Recorder(nn.Module):
    """Records the mode and grad state it runs in, and raises on request."""

    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        if self.fail:
            raise RuntimeError("forward failed")
        return x


def test_hooks_removed_and_modes_restored():
    recorder = _Recorder()
    model = nn.Sequential(nn.Linear(3, 3), recorder, nn.Linear(3, 2))
    model.train()
    model[2].eval()

    collect_input_statistics(model, torch.randn(4, 3), progress=False)

    assert recorder.seen == [(False, False)]
    _assert_no_hooks(model)
    assert [module.training for module in model.modules()] == [True, True, True, False]


def test_hooks_removed_when_forward_raises():
    model = nn.Sequential(nn.Linear(3, 3), _Recorder(fail=True))
    model.train()

    with pytest.raises(RuntimeError, match="forward failed"):
        collect_input_statistics(model, torch.randn(4, 3), progress=False)

    _assert_no_hooks(model)
    assert all(module.training for module in model.modules())


def test_non_finite_input_names_layer():
    model = _small_cnn()
    inputs = torch.randn(2, 3, 6, 6)
    inputs[1, 0, 2, 2] = float("nan")

    with pytest.raises(ValueError, match="layer 0 contains non-finite"):
        collect_input_statistics(model, inputs, progress=False)

    _assert_no_hooks(model)


def test_inputs_and_weights_unmodified():
    model = _small_cnn()
    inputs = torch.randn(4, 3, 6, 6)
    inputs_before = inputs.clone()
    weights_before = {name: value.clone() for name, value in model.state_dict().items()}

    collect_input_statistics(model, inputs, progress=False)

    assert torch.equal(inputs, inputs_before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights_before[name])


def test_argument_errors():
    model = _small_cnn()
    inputs = torch.randn(2, 3, 6, 6)

    with pytest.raises(ValueError, match="batch_size applies only"):
        collect_input_statistics(model, [inputs], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        collect_input_statistics(model, inputs, batch_size=0)
    with pytest.raises(ValueError, match="max_patches_per_chunk"):
        collect_input_statistics(model, inputs, max_patches_per_chunk=0)
    with pytest.raises(TypeError, match="got dict"):
        collect_input_statistics(model, [{"x": inputs}], progress=False)


def test_collection_on_device(device):
    model = _small_cnn()
    inputs = torch.randn(4, 3, 6, 6)
    expected = collect_input_statistics(model, inputs, progress=False)

    result = collect_input_statistics(model.to(device), inputs, progress=False)

    assert result["0"].device.type == device
    # float32 convolutions on a GPU may round differently from the CPU ones.
    moved = {name: stats.to("cpu") for name, stats in result.items()}
    _assert_same_statistics(moved, expected, tol=1e-5)


def test_empty_batch_left_out(conv_route, caplog):
    # A batch of no images adds nothing, on every route.
    conv = nn.Conv2d(16, 2, kernel_size=3, padding=1)

    with caplog.at_level(logging.WARNING, logger="tensorly_datc.nn.statistics"):
        statistics = collect_input_statistics(conv, torch.randn(0, 16, 8, 8), progress=False)

    assert statistics == {}
    assert "received no input" in caplog.text


def test_empty_batch_among_others(conv_route):
    torch.manual_seed(9)
    conv = nn.Conv2d(16, 2, kernel_size=3, padding=1).double()
    inputs = torch.randn(3, 16, 6, 5, dtype=torch.float64)

    statistics = collect_input_statistics(
        conv, [inputs, inputs[:0]], progress=False, max_patches_per_chunk=64
    )[""]

    _assert_matches_rows(statistics, _reference_conv_patches(conv, inputs))


@pytest.mark.parametrize(
    "options",
    [dict(kernel_size=7), dict(kernel_size=7, dilation=3, padding=(1, 2))],
    ids=["valid 7x7", "dilated 7x7"],
)
def test_float32_accuracy_with_small_outputs(options, conv_route):
    # The output covers a small part of the input, so most of each pixel pair's product lies
    # outside every tap's rectangle. A plain float32 product of the unfolded patches errs by
    # about 3e-7 of the largest diagonal entry here.
    torch.manual_seed(10)
    conv = nn.Conv2d(16, 2, **options)
    inputs = torch.randn(64, 16, 20, 20) + 10

    statistics = collect_input_statistics(conv, inputs, progress=False)[""]

    rows = _reference_conv_patches(conv, inputs)
    expected = rows.T @ rows / rows.shape[0]
    error = (statistics.second_moment - expected).abs().max()
    assert error <= 3e-6 * expected.diagonal().max()


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_overflow_names_layer(layer):
    # Float32 products of entries of 1e20 exceed the float32 range.
    model = nn.Conv2d(16, 2, kernel_size=3, padding=1) if layer == "conv" else nn.Linear(16, 2)
    inputs = torch.full((2, 16, 6, 6), 1e20) if layer == "conv" else torch.full((4, 16), 1e20)

    with pytest.raises(ValueError, match="moments of layer '' overflowed"):
        collect_input_statistics(model, inputs, progress=False)


def test_data_and_progress_types_checked():
    conv = nn.Conv2d(3, 2, kernel_size=3)

    with pytest.raises(TypeError, match="data must be a tensor.*got int"):
        collect_input_statistics(conv, 5, progress=False)
    with pytest.raises(TypeError, match="progress must be True or False"):
        collect_input_statistics(conv, torch.randn(2, 3, 5, 5), progress="yes")
