"""Tests for CIFAR-10 loading, image crops and accuracy measurement."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tensorly_datc.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    evaluate_accuracy,
    image_crops,
    load_cifar10,
    normalize_images,
)


def normalized_value(value, channel):
    return (value / 255 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]


@pytest.fixture
def small_archive(tmp_path):
    """Archive of 5 random images in the CIFAR-10 layout, and the arrays written to it."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(5, dtype=np.int64)
    path = tmp_path / "small.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


# load_cifar10 on a small archive written here


def test_load_cifar10_shapes_dtypes(small_archive):
    path, _, _ = small_archive
    images, labels = load_cifar10(path)
    assert images.shape == (5, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.shape == (5,)
    assert labels.dtype == torch.int64


def test_load_cifar10_normalisation(small_archive):
    path, raw_images, raw_labels = small_archive
    images, labels = load_cifar10(path)
    for index, row, column, channel in [(0, 0, 0, 0), (1, 5, 7, 1), (4, 31, 31, 2)]:
        value = int(raw_images[index, row, column, channel])
        expected = normalized_value(value, channel)
        assert images[index, channel, row, column].item() == pytest.approx(expected, abs=1e-6)
    assert np.array_equal(labels.numpy(), raw_labels)


def test_load_cifar10_first_n(small_archive):
    path, _, raw_labels = small_archive
    all_images, _ = load_cifar10(path)
    images, labels = load_cifar10(path, n=2)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images, all_images[:2])
    assert np.array_equal(labels.numpy(), raw_labels[:2])


@pytest.mark.parametrize("n", [-1, 6, 2.5, True])
def test_load_cifar10_bad_n_raises(small_archive, n):
    path, _, _ = small_archive
    with pytest.raises(ValueError, match="n must be an integer"):
        load_cifar10(path, n=n)


def test_load_cifar10_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cifar10(tmp_path / "absent.npz")


def test_load_cifar10_missing_key_raises(tmp_path):
    path = tmp_path / "no_labels.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="'labels'"):
        load_cifar10(path)


@pytest.mark.parametrize(
    "dtype, shape",
    [(np.float64, (2, 32, 32, 3)), (np.uint8, (2, 3, 32, 32)), (np.uint8, (2, 28, 28, 3))],
)
def test_load_cifar10_wrong_images_raises(tmp_path, dtype, shape):
    path = tmp_path / "bad_images.npz"
    np.savez(path, images=np.zeros(shape, dtype=dtype), labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="images must be a uint8 array"):
        load_cifar10(path)


def test_load_cifar10_label_count_mismatch_raises(tmp_path):
    path = tmp_path / "short_labels.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), dtype=np.uint8), labels=np.zeros(3))
    with pytest.raises(ValueError, match="labels must have shape"):
        load_cifar10(path)


def test_normalize_images_extremes():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[1] = 255
    tensor = normalize_images(images)
    for channel in range(3):
        assert tensor[0, channel, 0, 0].item() == pytest.approx(normalized_value(0, channel))
        assert tensor[1, channel, 3, 3].item() == pytest.approx(normalized_value(255, channel))


# load_cifar10 on the real test split


@pytest.mark.data
def test_load_cifar10_real_archive(data_dir):
    path = data_dir / "cifar10_test.npz"
    images, labels = load_cifar10(path, n=100)
    assert images.shape == (100, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert set(labels.tolist()) <= set(range(10))

    with np.load(path) as archive:
        raw_images = archive["images"][:100]
    for channel in range(3):
        value = int(raw_images[7, 3, 11, channel])
        expected = normalized_value(value, channel)
        assert images[7, channel, 3, 11].item() == pytest.approx(expected, abs=1e-6)


# evaluate_accuracy


class PassLogits(torch.nn.Module):
    """Return the inputs as logits after a batch norm with identity statistics.

    The batch norm shows whether eval mode was used, because in train mode it would normalise
    each batch and update its running statistics. It also records whether gradients were enabled.
    """

    def __init__(self, n_classes):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(n_classes, affine=False)
        self.grad_enabled_in_forward = []

    def forward(self, x):
        self.grad_enabled_in_forward.append(torch.is_grad_enabled())
        return self.norm(x)


def one_hot_logits(predictions, n_classes=4):
    return torch.nn.functional.one_hot(torch.as_tensor(predictions), n_classes).float()


def test_evaluate_accuracy_value():
    predictions = [0, 1, 2, 3, 0, 1, 2]
    labels = torch.tensor([0, 1, 2, 0, 0, 3, 2])  # 5 of 7 correct
    model = PassLogits(4)
    accuracy = evaluate_accuracy(model, one_hot_logits(predictions), labels, batch_size=3)
    assert isinstance(accuracy, float)
    assert accuracy == pytest.approx(5 / 7)
    assert model.grad_enabled_in_forward == [False, False, False]


def test_evaluate_accuracy_uses_eval_mode():
    model = PassLogits(4).train()
    running_mean = model.norm.running_mean.clone()
    evaluate_accuracy(model, one_hot_logits([0, 1]), torch.tensor([0, 1]), batch_size=2)
    assert torch.equal(model.norm.running_mean, running_mean)


def test_evaluate_accuracy_restores_modes():
    model = PassLogits(4).train()
    evaluate_accuracy(model, one_hot_logits([0, 1]), torch.tensor([0, 1]))
    assert model.training
    assert model.norm.training

    model.eval()
    evaluate_accuracy(model, one_hot_logits([0, 1]), torch.tensor([0, 1]))
    assert not model.training

    # Each submodule gets its own mode back, even when they differ
    model.train()
    model.norm.eval()
    evaluate_accuracy(model, one_hot_logits([0, 1]), torch.tensor([0, 1]))
    assert model.training
    assert not model.norm.training


def test_evaluate_accuracy_length_mismatch_raises():
    with pytest.raises(ValueError, match="same length"):
        evaluate_accuracy(PassLogits(4), one_hot_logits([0, 1]), torch.tensor([0, 1, 2]))


def test_evaluate_accuracy_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(PassLogits(4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("batch_size", [0, -1, 2.0])
def test_evaluate_accuracy_bad_batch_size_raises(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_accuracy(
            PassLogits(4), one_hot_logits([0]), torch.tensor([0]), batch_size=batch_size
        )


# image_crops


def test_image_crops_shape_dtype():
    crops = image_crops(6, size=24)
    assert crops.shape == (6, 3, 24, 24)
    assert crops.dtype == torch.float32


def test_image_crops_normalised_pixels():
    crops = image_crops(8)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    # Undoing the normalisation must give whole pixel values from 0 to 255
    pixels = (crops * std + mean) * 255
    assert float(pixels.min()) > -1e-3
    assert float(pixels.max()) < 255 + 1e-3
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)


def test_image_crops_deterministic():
    assert torch.equal(image_crops(5, random_state=1), image_crops(5, random_state=1))
    assert not torch.equal(image_crops(5, random_state=1), image_crops(5, random_state=2))


def test_image_crops_generator_random_state():
    first = image_crops(3, random_state=np.random.RandomState(7))
    assert torch.equal(first, image_crops(3, random_state=7))


@pytest.mark.parametrize("size", [0, 428, 3.5])
def test_image_crops_bad_size_raises(size):
    with pytest.raises(ValueError, match="size must be an integer"):
        image_crops(2, size=size)


def test_image_crops_bad_n_raises():
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        image_crops(-1)
