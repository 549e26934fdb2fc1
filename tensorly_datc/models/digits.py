"""A small CNN for the 8x8 handwritten digits bundled with scikit-learn.

The digits data set (``sklearn.datasets.load_digits``, 1797 grey images of 8 x 8 pixels with
16 grey levels) ships with scikit-learn, so this network can be trained and compressed in
tests and examples without downloading anything.
"""

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

__all__ = ["DigitsCNN", "DigitsSplit", "load_digits_split", "train_digits_cnn"]

# Fractions of the 1797 images in the calibration and test splits. The rest is for training.
CALIBRATION_FRACTION = 0.2
TEST_FRACTION = 0.2

# The digits' pixel values are integers from 0 to 16.
_MAX_PIXEL_VALUE = 16.0


class DigitsCNN(nn.Module):
    """Three-layer CNN for 8x8 grey images.

    ``conv1`` (1 -> 16), ``conv2`` (16 -> 32), 2x2 max pooling, ``conv3`` (32 -> 32), global
    average pooling and ``linear`` (32 -> ``num_classes``). Every convolution is 3x3 with
    padding 1, no bias, and is followed by batch normalisation and ReLU.

    Parameters
    ----------
    num_classes : int, default is 10
        Number of outputs.
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.max_pool2d(out, 2)
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def extra_repr(self):
        return f"num_classes={self.num_classes}"


class DigitsSplit(NamedTuple):
    """Train, calibration and test parts of the digits data set.

    Each field is a pair ``(images, labels)``: a float32 tensor of shape ``(n, 1, 8, 8)`` and
    an int64 tensor of shape ``(n,)``.
    """

    train: tuple
    calibration: tuple
    test: tuple


def load_digits_split(random_state=0):
    """Load scikit-learn's digits and split them into train, calibration and test sets.

    The split is stratified by class: 60 % train, 20 % calibration, 20 % test. Pixels are
    scaled to [0, 1], then standardised with the mean and standard deviation of all training
    pixels (one scalar each), so the calibration and test sets carry no information into the
    normalisation.

    Parameters
    ----------
    random_state : int, default is 0
        Seed of the split. The same seed always gives the same split.

    Returns
    -------
    DigitsSplit
        Named tuple with fields ``train``, ``calibration`` and ``test``, each
        ``(images, labels)`` with images float32 of shape ``(n, 1, 8, 8)`` and labels int64.

    Examples
    --------
    >>> split = load_digits_split()
    >>> images, labels = split.train
    >>> images.shape, labels.dtype
    (torch.Size([1077, 1, 8, 8]), torch.int64)
    """
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / _MAX_PIXEL_VALUE
    labels = digits.target.astype(np.int64)

    # Split off the test set, then the calibration set from the rest
    rest_images, test_images, rest_labels, test_labels = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=random_state
    )
    train_images, calibration_images, train_labels, calibration_labels = train_test_split(
        rest_images,
        rest_labels,
        test_size=CALIBRATION_FRACTION / (1 - TEST_FRACTION),
        stratify=rest_labels,
        random_state=random_state,
    )

    # Standardise with the training statistics only
    mean = train_images.mean()
    std = train_images.std()

    def to_tensors(part_images, part_labels):
        return (
            torch.from_numpy((part_images - mean) / std),
            torch.from_numpy(part_labels),
        )

    return DigitsSplit(
        train=to_tensors(train_images, train_labels),
        calibration=to_tensors(calibration_images, calibration_labels),
        test=to_tensors(test_images, test_labels),
    )


def train_digits_cnn(random_state=0, epochs=10, batch_size=32, learning_rate=0.05, progress=False):
    """Train a :class:`DigitsCNN` on the training part of :func:`load_digits_split`.

    Training uses SGD with momentum 0.9, weight decay 5e-4 and a cosine learning-rate
    schedule. It runs on the CPU in a single thread, with the global torch RNG seeded from
    ``random_state``, so the same arguments give bit-identical weights on a given machine
    and torch build. The caller's RNG state and thread count are restored afterwards.

    Parameters
    ----------
    random_state : int, default is 0
        Seed of the data split, the weight initialisation and the batch order.
    epochs : int, default is 10
        Number of passes over the training set.
    batch_size : int, default is 32
        Number of images per SGD step.
    learning_rate : float, default is 0.05
        Initial SGD learning rate.
    progress : bool, default is False
        Whether to show a tqdm progress bar over the epochs.

    Returns
    -------
    DigitsCNN
        The trained network on the CPU, in eval mode.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    images, labels = load_digits_split(random_state).train

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_state)
            model = DigitsCNN()
            _fit(model, images, labels, epochs, batch_size, learning_rate, progress)
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval()


def _fit(model, images, labels, epochs, batch_size, learning_rate, progress):
    optimizer = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=5e-4
    )
    steps_per_epoch = -(-len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)

    model.train()
    for _ in tqdm(range(epochs), desc="training DigitsCNN", disable=not progress):
        order = torch.randperm(len(images))
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
