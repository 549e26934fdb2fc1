"""Tests of saving a compressed model and loading it back into a freshly built model."""

import copy
import json
import struct
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from tensorly_datc.nn import compress, load_compressed, save_compressed  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run torch on one thread, restoring the previous count afterwards.

    The layers here are small, and on a machine whose cores are busy with other work a second
    thread's synchronisation made compression 10 to 100 times slower (measured on a shared
    2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_model(seed=0, body_channels=32):
    """Return a fresh model with BatchNorm, a 3x3 conv, a 5x3 conv, a 1x1 conv and a Linear layer.

    Each call with a new ``seed`` gives other initial weights, as a rebuilt model would have.
    """
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1, bias=False),
        norm=nn.BatchNorm2d(16),
        relu1=nn.ReLU(),
        body=nn.Conv2d(16, body_channels, (5, 3), padding=(2, 1)),
        relu2=nn.ReLU(),
        mix=nn.Conv2d(body_channels, 24, 1),
        pool=nn.AdaptiveAvgPool2d(2),
        flatten=nn.Flatten(),
        head=nn.Linear(96, 10),
    )).eval()


def calibration_inputs(n=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 8, 8), generator=generator)


@pytest.fixture(scope="module", params=["tucker2", "cp4", "cp3"])
def saved_model(request, tmp_path_factory):
    """Return (compressed model, report, path of its file) for each factorisation of the convs."""
    model = build_model()
    with torch.no_grad():
        # Running statistics other than the defaults, so that the buffers must be saved too.
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    compressed, report = compress(model, calibration_inputs(), method=request.param, layers="all", progress=False,
                                  decomposition_options={"n_iter_max": 10})
    path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
    save_compressed(compressed, report, path)
    return compressed, report, path


def test_round_trip_same_outputs(saved_model):
    compressed, _, path = saved_model
    inputs = calibration_inputs(n=8, seed=3)

    loaded = load_compressed(build_model(seed=7), path)

    with torch.no_grad():
        assert torch.equal(loaded(inputs), compressed(inputs))


def test_round_trip_same_state_dict(saved_model):
    compressed, _, path = saved_model

    loaded = load_compressed(build_model(seed=7), path)

    expected, got = compressed.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_round_trip_same_structure(saved_model):
    compressed, report, path = saved_model

    loaded = load_compressed(build_model(seed=7), path)

    assert [row.name for row in report.compressed] == ["stem", "body", "mix", "head"]
    assert str(loaded) == str(compressed)


def test_file_keys_match_model(saved_model):
    compressed, _, path = saved_model

    # Loading the file's tensors with strict=False reports what load_compressed's strict load
    # would reject.
    loaded = load_compressed(build_model(seed=7), path)
    result = loaded.load_state_dict(load_file(path), strict=False)

    assert result.missing_keys == []
    assert result.unexpected_keys == []


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_compressed(build_model(), tmp_path / "absent.safetensors")


def test_truncated_file_raises(saved_model, tmp_path):
    _, _, path = saved_model
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_compressed(build_model(), truncated)


def test_damaged_header_raises(saved_model, tmp_path):
    _, _, path = saved_model
    data = path.read_bytes()
    # A safetensors file starts with the header length (8 bytes, little endian), then the JSON header.
    header_length = struct.unpack("<Q", data[:8])[0]
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data[:8] + b"{" * header_length + data[8 + header_length:])

    with pytest.raises(ValueError, match="damaged.safetensors"):
        load_compressed(build_model(), damaged)


def test_not_safetensors_raises(tmp_path):
    path = tmp_path / "pickled.safetensors"
    torch.save(build_model().state_dict(), path)

    with pytest.raises(ValueError, match="pickled.safetensors"):
        load_compressed(build_model(), path)


def test_other_safetensors_file_raises(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({key: value.contiguous() for key, value in build_model().state_dict().items()}, str(path))

    with pytest.raises(ValueError, match="save_compressed"):
        load_compressed(build_model(), path)


def rewrite_structure(path, destination, edit):
    """Write the tensors of ``path`` to ``destination`` with the structure changed by ``edit``."""
    with open(path, "rb") as handle:
        data = handle.read()
    header_length = struct.unpack("<Q", data[:8])[0]
    metadata = json.loads(data[8:8 + header_length])["__metadata__"]
    structure = json.loads(metadata["structure"])
    edit(structure)
    metadata["structure"] = json.dumps(structure)
    save_file(load_file(path), str(destination), metadata=metadata)


def test_damaged_structure_json_raises(saved_model, tmp_path):
    _, _, path = saved_model
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    metadata = json.loads(data[8:8 + header_length])["__metadata__"]
    metadata["structure"] = metadata["structure"][:-5]
    damaged = tmp_path / "structure.safetensors"
    save_file(load_file(path), str(damaged), metadata=metadata)

    with pytest.raises(ValueError, match="structure"):
        load_compressed(build_model(), damaged)


def test_unknown_method_in_structure_raises(saved_model, tmp_path):
    _, _, path = saved_model
    tampered = tmp_path / "method.safetensors"
    rewrite_structure(path, tampered, lambda structure: structure[0].update(method="svd3"))

    with pytest.raises(ValueError, match="svd3"):
        load_compressed(build_model(), tampered)


def test_unknown_layer_in_structure_raises(saved_model, tmp_path):
    _, _, path = saved_model
    tampered = tmp_path / "layer.safetensors"
    rewrite_structure(path, tampered, lambda structure: structure[0].update(name="not_a_layer"))

    with pytest.raises(ValueError, match="not_a_layer"):
        load_compressed(build_model(), tampered)


def test_tampered_rank_raises(saved_model, tmp_path):
    _, report, path = saved_model
    tampered = tmp_path / "rank.safetensors"

    def lower_rank(structure):
        entry = next(entry for entry in structure if entry["name"] == "body")
        entry["rank"] = [r - 1 for r in entry["rank"]] if isinstance(entry["rank"], list) else entry["rank"] - 1

    rewrite_structure(path, tampered, lower_rank)

    # The error must name the layer whose saved tensors do not match the structure.
    with pytest.raises((ValueError, RuntimeError), match="body"):
        load_compressed(build_model(), tampered)


def test_other_architecture_raises(saved_model):
    _, _, path = saved_model

    with pytest.raises((ValueError, RuntimeError), match="body"):
        load_compressed(build_model(body_channels=24), path)


def test_failed_load_leaves_model_unchanged(saved_model):
    _, _, path = saved_model
    model = build_model(body_channels=24)
    state = copy.deepcopy(model.state_dict())
    types = [(name, type(module)) for name, module in model.named_modules()]

    with pytest.raises((ValueError, RuntimeError)):
        load_compressed(model, path)

    assert [(name, type(module)) for name, module in model.named_modules()] == types
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_into_compressed_model_raises(saved_model):
    compressed, _, path = saved_model

    # The structure's layers are already stacks in this model, not Conv2d or Linear layers.
    with pytest.raises(ValueError, match="stem"):
        load_compressed(copy.deepcopy(compressed), path)
