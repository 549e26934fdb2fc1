"""Image loading, normalisation and accuracy measurement for the reference models.

CIFAR-10 images are read from a NumPy ``.npz`` archive and normalised with the per-channel
mean and standard deviation that the pretrained CIFAR ResNets expect. :func:`image_crops`
cuts CIFAR-sized patches from the photos bundled with scikit-learn, which serve as
calibration data from a different image source than the test set.
"""

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_sample_images
from sklearn.utils import check_random_state

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "normalize_images",
    "load_cifar10",
    "evaluate_accuracy",
    "image_crops",
]

# Per-channel RGB statistics on the [0, 1] scale that the pretrained CIFAR ResNets were
# trained with. They are the ImageNet values, not statistics of CIFAR-10 itself.
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)


def normalize_images(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Convert uint8 RGB images to a normalised float32 tensor in channels-first layout.

    Each pixel value ``v`` of channel ``c`` becomes ``(v / 255 - mean[c]) / std[c]``.

    Parameters
    ----------
    images : numpy.ndarray
        Array of dtype uint8 and shape ``(n_images, height, width, 3)``.
    mean, std : tuple of 3 floats
        Per-channel mean and standard deviation on the [0, 1] scale.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape ``(n_images, 3, height, width)``.

    Raises
    ------
    ValueError
        If ``images`` is not a uint8 array of shape ``(n_images, height, width, 3)``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            "images must be a uint8 array of shape (n_images, height, width, 3); "
            f"got dtype {images.dtype} and shape {images.shape}"
        )
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((tensor - mean) / std).contiguous()


def load_cifar10(path, n=None):
    """Load CIFAR-10 images and labels from an ``.npz`` archive and normalise the images.

    Parameters
    ----------
    path : str or pathlib.Path
        Archive with an array ``images`` of dtype uint8 and shape ``(N, 32, 32, 3)`` in RGB
        order, and an array ``labels`` of shape ``(N,)``.
    n : int, optional
        Number of images to load, taken from the start of the archive. Default: all ``N``.

    Returns
    -------
    images : torch.Tensor
        float32 tensor of shape ``(n, 3, 32, 32)``, normalised with :data:`CIFAR10_MEAN` and
        :data:`CIFAR10_STD` on the [0, 1] scale.
    labels : torch.Tensor
        int64 tensor of shape ``(n,)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not an existing file.
    ValueError
        If the archive lacks ``images`` or ``labels``, the arrays have the wrong dtype or
        shape, or ``n`` is not an integer in ``[0, N]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive not found: {path}")

    with np.load(path) as archive:
        missing = [key for key in ("images", "labels") if key not in archive.files]
        if missing:
            raise ValueError(
                f"{path} is missing the array(s) {missing}; expected 'images' (uint8, shape "
                f"(N, 32, 32, 3)) and 'labels' (shape (N,)), found {archive.files}"
            )
        images = archive["images"]
        labels = archive["labels"]

    # Check the arrays and the requested count
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"{path}: images must be a uint8 array of shape (N, 32, 32, 3); "
            f"got dtype {images.dtype} and shape {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{path}: labels must have shape ({images.shape[0]},) to match the images; "
            f"got shape {labels.shape}"
        )
    n_available = images.shape[0]
    if n is None:
        n = n_available
    if not _is_integer(n) or not 0 <= n <= n_available:
        raise ValueError(f"n must be an integer in [0, {n_available}] or None; got {n!r}")

    return normalize_images(images[:n]), torch.from_numpy(labels[:n].astype(np.int64))


def evaluate_accuracy(model, images, labels, batch_size=500, device=None):
    """Measure the top-1 accuracy of a classifier.

    The model runs in eval mode under :func:`torch.no_grad`. Afterwards every submodule is
    returned to the train or eval mode it had before the call.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier that maps a batch of images to logits of shape ``(batch, n_classes)``.
    images : torch.Tensor
        Inputs, with the samples along the first axis.
    labels : torch.Tensor
        Integer class labels of shape ``(n_samples,)``.
    batch_size : int, default is 500
        Number of images per forward pass. Larger batches are faster but use more memory.
    device : str or torch.device, optional
        Device to run on. Default: the device of the model's first parameter, or the CPU
        for a model without parameters. The model is not moved, so it must already be there.

    Returns
    -------
    float
        Fraction of correctly classified images, in [0, 1].

    Raises
    ------
    ValueError
        If ``images`` and ``labels`` differ in length, are empty, or ``batch_size`` is not
        a positive integer.
    """
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels must have the same length; got {len(images)} and {len(labels)}"
        )
    if len(images) == 0:
        raise ValueError("images is empty, but at least one image is needed to measure accuracy")
    if not _is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if device is None:
        first_parameter = next(model.parameters(), None)
        device = first_parameter.device if first_parameter is not None else torch.device("cpu")

    # Record each submodule's mode, because model.train(mode) would set them all alike
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    n_correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device)
                batch_labels = labels[start : start + batch_size].to(device)
                predictions = model(batch).argmax(dim=1)
                n_correct += int((predictions == batch_labels).sum())
    finally:
        for module, training in modes:
            module.training = training
    return n_correct / len(images)


def image_crops(n, size=32, random_state=0):
    """Cut random square crops from the sample photos bundled with scikit-learn.

    The crops come from ``sklearn.datasets.load_sample_images`` (two 427 x 640 RGB photos,
    so no download is needed). Each crop picks a photo and a position uniformly at random.
    The crops are normalised like CIFAR-10, with :data:`CIFAR10_MEAN` and
    :data:`CIFAR10_STD`, and serve as calibration inputs from another image source.

    Parameters
    ----------
    n : int
        Number of crops.
    size : int, default is 32
        Height and width of each crop in pixels, at most the shorter side of the photos.
    random_state : None, int or numpy.random.RandomState, default is 0
        Seed or generator for the photo and position of each crop.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape ``(n, 3, size, size)``.

    Raises
    ------
    ValueError
        If ``n`` is negative or ``size`` is not in ``[1, min photo side]``.

    Examples
    --------
    >>> image_crops(4, size=16).shape
    torch.Size([4, 3, 16, 16])
    """
    photos = load_sample_images().images
    max_size = min(min(photo.shape[0], photo.shape[1]) for photo in photos)
    if not _is_integer(n) or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    if not _is_integer(size) or not 1 <= size <= max_size:
        raise ValueError(f"size must be an integer in [1, {max_size}]; got {size!r}")

    rng = check_random_state(random_state)
    crops = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.randint(len(photos))]
        top = rng.randint(photo.shape[0] - size + 1)
        left = rng.randint(photo.shape[1] - size + 1)
        crops[i] = photo[top : top + size, left : left + size]
    return normalize_images(crops)


def _is_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
