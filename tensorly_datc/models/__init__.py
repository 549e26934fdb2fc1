"""Reference network architectures used by the examples and benchmarks."""

from .cifar_resnet import (
    BasicBlock,
    CifarResNet,
    ZeroPadShortcut,
    cifar_resnet,
    load_cifar_resnet,
)
from .digits import DigitsCNN, DigitsSplit, load_digits_split, train_digits_cnn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ZeroPadShortcut",
    "cifar_resnet",
    "load_cifar_resnet",
    "DigitsCNN",
    "DigitsSplit",
    "load_digits_split",
    "train_digits_cnn",
]
