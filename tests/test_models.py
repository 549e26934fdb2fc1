"""Tests for the reference CIFAR ResNets and the digits CNN."""

import pytest

torch = pytest.importorskip("torch")

from tensorly_datc.data import evaluate_accuracy, load_cifar10  # noqa: E402
from tensorly_datc.models import (  # noqa: E402
    ZeroPadShortcut,
    cifar_resnet,
    load_cifar_resnet,
    load_digits_split,
    train_digits_cnn,
)

DEPTHS = [20, 32, 44, 56]

# torch 2.14 marks torch.jit.script as deprecated, but it still works and is tested here.
ignore_jit_deprecation = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")


def expected_state_dict_keys(num_blocks):
    """State dict keys of a CIFAR ResNet, listed from the architecture description."""

    def batch_norm_keys(prefix):
        suffixes = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        return [f"{prefix}.{suffix}" for suffix in suffixes]

    keys = ["conv1.weight"] + batch_norm_keys("bn1")
    for stage in (1, 2, 3):
        for block in range(num_blocks):
            prefix = f"layer{stage}.{block}"
            keys += [f"{prefix}.conv1.weight"] + batch_norm_keys(f"{prefix}.bn1")
            keys += [f"{prefix}.conv2.weight"] + batch_norm_keys(f"{prefix}.bn2")
    return keys + ["linear.weight", "linear.bias"]


def expected_parameter_count(num_blocks, num_classes=10):
    """Trainable parameters of a CIFAR ResNet, counted from the architecture description."""
    count = 3 * 16 * 9 + 2 * 16  # stem convolution and its batch norm
    in_channels = 16
    for channels in (16, 32, 64):
        for _ in range(num_blocks):
            count += in_channels * channels * 9 + 2 * channels  # conv1 and bn1
            count += channels * channels * 9 + 2 * channels  # conv2 and bn2
            in_channels = channels
    return count + 64 * num_classes + num_classes  # linear layer


def pretrained_path(data_dir, depth):
    (path,) = (data_dir / "cifar10_resnets").glob(f"resnet{depth}-*.th")
    return path


# CIFAR ResNet architecture


def test_resnet20_state_dict_keys():
    model = cifar_resnet(20)
    assert list(model.state_dict()) == expected_state_dict_keys(3)


def test_resnet20_parameter_count():
    model = cifar_resnet(20)
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    assert n_parameters == expected_parameter_count(3)
    # The same sum written out: stem 464, stage 1 14,016, stage 2 51,072, stage 3 203,520,
    # linear 650. About 0.27 M.
    assert n_parameters == 269_722


def test_resnet_convolutions_have_no_bias():
    model = cifar_resnet(20)
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == 19
    for convolution in convolutions:
        assert convolution.bias is None


@pytest.mark.parametrize("depth", DEPTHS)
def test_resnet_depths_output_shape(depth):
    model = cifar_resnet(depth)
    num_blocks = (depth - 2) // 6
    assert model.depth == depth
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == num_blocks
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    assert n_parameters == expected_parameter_count(num_blocks)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_num_classes():
    model = cifar_resnet(20, num_classes=7)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("depth", [0, 2, 8.0, 19, 21, 30, -4, True, "20"])
def test_resnet_bad_depth_raises(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(depth)


def test_zero_pad_shortcut_values():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    # 8 zero channels on each side, the subsampled input in between
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 24:], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])


def test_zero_pad_shortcut_odd_difference_raises():
    with pytest.raises(ValueError, match="even"):
        ZeroPadShortcut(16, 31)


def test_stage_transitions_use_zero_pad_shortcut():
    model = cifar_resnet(20)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    assert isinstance(model.layer2[0].shortcut, ZeroPadShortcut)
    assert isinstance(model.layer3[0].shortcut, ZeroPadShortcut)
    assert isinstance(model.layer2[1].shortcut, torch.nn.Identity)
    assert model.layer2[0].conv1.stride == (2, 2)
    assert model.layer3[0].conv1.stride == (2, 2)


@ignore_jit_deprecation
def test_resnet_scriptable():
    model = cifar_resnet(20).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


# Loading saved weights (files written here, no real data needed)


def test_load_plain_state_dict(tmp_path):
    model = cifar_resnet(32).eval()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    loaded = load_cifar_resnet(path)
    assert loaded.depth == 32
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_checkpoint_with_prefix(tmp_path):
    model = cifar_resnet(20, num_classes=5)
    state_dict = {f"module.{key}": value for key, value in model.state_dict().items()}
    path = tmp_path / "checkpoint.th"
    torch.save({"best_prec1": 50.0, "state_dict": state_dict}, path)
    loaded = load_cifar_resnet(path)
    assert loaded.depth == 20
    assert loaded.linear.out_features == 5
    assert torch.equal(loaded.layer3[2].conv2.weight, model.layer3[2].conv2.weight)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cifar_resnet(tmp_path / "absent.th")


def test_load_wrong_keys_raises(tmp_path):
    state_dict = {
        key.replace("conv", "convolution"): value
        for key, value in cifar_resnet(20).state_dict().items()
    }
    path = tmp_path / "renamed.th"
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(ValueError, match="not a CIFAR ResNet"):
        load_cifar_resnet(path)


def test_load_mismatched_stages_raises(tmp_path):
    # layer1 has 3 blocks (ResNet-20) but layer2 and layer3 have 5 (ResNet-32)
    state_dict = cifar_resnet(32).state_dict()
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if not (key.startswith("layer1.") and int(key.split(".")[1]) >= 3)
    }
    path = tmp_path / "mixed.th"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match="does not match a CIFAR ResNet-20"):
        load_cifar_resnet(path)


def test_load_wrong_shape_raises(tmp_path):
    state_dict = cifar_resnet(20).state_dict()
    state_dict["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    path = tmp_path / "misshaped.th"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match="size mismatch"):
        load_cifar_resnet(path)


def test_load_non_dict_raises(tmp_path):
    path = tmp_path / "tensor.th"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="does not contain a state dict"):
        load_cifar_resnet(path)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"", b"PK\x03\x04 truncated zip"])
def test_load_non_checkpoint_raises(tmp_path, content):
    path = tmp_path / "notes.th"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="notes.th is not a PyTorch checkpoint") as caught:
        load_cifar_resnet(path)
    # The message must not pass on torch's advice to load the file without weights_only.
    assert "weights_only set to False" not in str(caught.value)


# Pretrained weights on real CIFAR-10 images


@pytest.mark.data
def test_pretrained_resnet20_accuracy(data_dir):
    model = load_cifar_resnet(pretrained_path(data_dir, 20))
    images, labels = load_cifar10(data_dir / "cifar10_test.npz", n=1000)
    accuracy = evaluate_accuracy(model, images, labels)
    print(f"ResNet-20 top-1 on the first 1000 test images: {accuracy:.3f}")
    # 81.0 % is the measured figure on all 10,000 of these JPEG-decoded images, so a
    # 1000-image sample should be well above 75 % unless the weights or inputs are wrong.
    assert accuracy >= 0.75


@pytest.mark.data
def test_pretrained_resnet56_depth(data_dir):
    model = load_cifar_resnet(pretrained_path(data_dir, 56))
    assert model.depth == 56
    assert len(model.layer1) == 9
    assert not model.training


# Digits CNN


@pytest.fixture(scope="module")
def digits_model():
    return train_digits_cnn(random_state=0)


def test_digits_split_shapes():
    split = load_digits_split(random_state=0)
    sizes = [len(split.train[0]), len(split.calibration[0]), len(split.test[0])]
    assert sum(sizes) == 1797
    assert sizes == [1077, 360, 360]
    for images, labels in split:
        assert images.shape[1:] == (1, 8, 8)
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert len(images) == len(labels)


def test_digits_split_normalised_on_train():
    train_images, _ = load_digits_split(random_state=0).train
    assert abs(float(train_images.mean())) < 1e-5
    assert abs(float(train_images.std()) - 1) < 1e-3


def test_digits_split_deterministic():
    first = load_digits_split(random_state=3)
    second = load_digits_split(random_state=3)
    other = load_digits_split(random_state=4)
    assert torch.equal(first.test[0], second.test[0])
    assert torch.equal(first.train[1], second.train[1])
    assert not torch.equal(first.test[0], other.test[0])


def test_digits_cnn_accuracy(digits_model):
    images, labels = load_digits_split(random_state=0).test
    accuracy = evaluate_accuracy(digits_model, images, labels)
    print(f"DigitsCNN test accuracy: {accuracy:.3f}")
    assert accuracy >= 0.95
    assert not digits_model.training


def test_digits_cnn_same_seed_same_weights(digits_model):
    retrained = train_digits_cnn(random_state=0)
    for key, value in digits_model.state_dict().items():
        assert torch.equal(retrained.state_dict()[key], value), key


def test_digits_training_restores_global_state():
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    train_digits_cnn(random_state=1, epochs=1)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_digits_training_bad_epochs_raises():
    with pytest.raises(ValueError, match="epochs"):
        train_digits_cnn(epochs=0)


@ignore_jit_deprecation
def test_digits_cnn_scriptable(digits_model):
    scripted = torch.jit.script(digits_model)
    images, _ = load_digits_split(random_state=0).test
    with torch.no_grad():
        torch.testing.assert_close(scripted(images[:8]), digits_model(images[:8]))
