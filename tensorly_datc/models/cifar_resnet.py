"""CIFAR-10 ResNets of He et al. and a loader for their pretrained weights.

The networks follow section 4.2 of [1]_: a 3x3 convolution with 16 filters, three stages of
``n`` basic blocks with 16, 32 and 64 channels, global average pooling and a linear classifier,
for a depth of ``6n + 2`` layers. Shortcuts that change shape are parameter free ("option A"):
they subsample the input with stride 2 and pad the new channels with zeros.

References
----------
.. [1] K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for Image Recognition",
       CVPR 2016, pp. 770-778.
"""

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ZeroPadShortcut",
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "load_cifar_resnet",
]

logger = logging.getLogger(__name__)

STAGE_CHANNELS = (16, 32, 64)

# Key prefix that torch.nn.DataParallel adds to every entry of a saved state dict.
_DATA_PARALLEL_PREFIX = "module."

_LAYER1_BLOCK_KEY = re.compile(r"^layer1\.(\d+)\.conv1\.weight$")


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut that subsamples spatially and zero-pads the channels.

    The input is subsampled with ``x[:, :, ::stride, ::stride]`` and padded with
    ``(out_channels - in_channels) // 2`` zero channels on each side of the channel axis.
    This is shortcut "option A" of He et al. (2016).

    Parameters
    ----------
    in_channels : int
        Number of channels of the input.
    out_channels : int
        Number of channels of the output. ``out_channels - in_channels`` must be even and
        non-negative.
    stride : int, default is 2
        Spatial subsampling step.
    """

    def __init__(self, in_channels, out_channels, stride=2):
        super().__init__()
        extra_channels = out_channels - in_channels
        if extra_channels < 0 or extra_channels % 2:
            raise ValueError(
                "out_channels - in_channels must be even and non-negative; "
                f"got in_channels={in_channels}, out_channels={out_channels}"
            )
        if stride < 1:
            raise ValueError(f"stride must be a positive integer; got {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.channel_padding = extra_channels // 2

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad lists (before, after) pairs from the last axis backwards: width, height, channels.
        return F.pad(x, (0, 0, 0, 0, self.channel_padding, self.channel_padding))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions with batch normalisation.

    Computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. The shortcut is the
    identity when the shape is unchanged and a :class:`ZeroPadShortcut` otherwise.

    Parameters
    ----------
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output channels of both convolutions.
    stride : int, default is 1
        Stride of the first convolution and of the shortcut.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(
            out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_channels)

        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNet(nn.Module):
    """ResNet for 32x32 images with three stages of basic blocks.

    Parameters
    ----------
    num_blocks : int
        Number of basic blocks in each of the three stages. The network has
        ``6 * num_blocks + 2`` weighted layers.
    num_classes : int, default is 10
        Number of outputs of the final linear layer.

    Attributes
    ----------
    depth : int
        Number of weighted layers, ``6 * num_blocks + 2``.
    """

    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer; got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.num_classes = num_classes
        self.depth = 6 * num_blocks + 2

        self.conv1 = nn.Conv2d(3, STAGE_CHANNELS[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.layer1 = self._make_stage(STAGE_CHANNELS[0], STAGE_CHANNELS[0], stride=1)
        self.layer2 = self._make_stage(STAGE_CHANNELS[0], STAGE_CHANNELS[1], stride=2)
        self.layer3 = self._make_stage(STAGE_CHANNELS[1], STAGE_CHANNELS[2], stride=2)
        self.linear = nn.Linear(STAGE_CHANNELS[2], num_classes)

        # He (Kaiming) normal initialisation for the convolutions. BatchNorm and Linear keep
        # the PyTorch defaults.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(self, in_channels, out_channels, stride):
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        for _ in range(self.num_blocks - 1):
            blocks.append(BasicBlock(out_channels, out_channels, 1))
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def extra_repr(self):
        return f"depth={self.depth}, num_classes={self.num_classes}"


def cifar_resnet(depth=20, num_classes=10):
    """Build a CIFAR ResNet of the given depth with freshly initialised weights.

    Parameters
    ----------
    depth : int, default is 20
        Number of weighted layers, of the form ``6n + 2`` with ``n >= 1``, for example
        20, 32, 44 or 56 for 3, 5, 7 or 9 blocks per stage.
    num_classes : int, default is 10
        Number of outputs.

    Returns
    -------
    CifarResNet
        The network, in training mode.

    Raises
    ------
    ValueError
        If ``depth`` is not an integer of the form ``6n + 2`` with ``n >= 1``.

    Examples
    --------
    >>> import torch
    >>> model = cifar_resnet(20)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    is_integer = isinstance(depth, int) and not isinstance(depth, bool)
    if not is_integer or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "depth must be an integer of the form 6n + 2 with n >= 1 "
            f"(for example 20, 32, 44, 56, 110); got {depth!r}"
        )
    return CifarResNet((depth - 2) // 6, num_classes=num_classes)


def load_cifar_resnet(path, map_location="cpu"):
    """Load a pretrained CIFAR ResNet, reading its depth from the saved weights.

    The file is read with ``torch.load(..., weights_only=True)``. It may contain a checkpoint
    dict with a ``'state_dict'`` entry or a plain state dict. A ``module.`` prefix on the keys,
    which ``torch.nn.DataParallel`` adds, is removed. The number of blocks per stage is the
    number of ``layer1.<i>`` blocks, and the number of classes is the number of rows of
    ``linear.weight``.

    Parameters
    ----------
    path : str or pathlib.Path
        File written by ``torch.save``.
    map_location : str or torch.device, default is "cpu"
        Device to load the tensors onto, passed to :func:`torch.load`.

    Returns
    -------
    CifarResNet
        The network with the loaded weights, in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not an existing file.
    ValueError
        If the file is not a checkpoint that loads with ``weights_only=True``, does not contain
        a state dict, or the state dict's keys or shapes do not match a CIFAR ResNet.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained CIFAR ResNet file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # torch.load raises many types (UnpicklingError, RuntimeError, KeyError, EOFError...)
        # for a file that is not a checkpoint, and its advice to turn off weights_only would run
        # arbitrary code from such a file: report the file instead.
        message = str(error).strip()
        reason = type(error).__name__ + (f": {message.splitlines()[0]}" if message else "")
        raise ValueError(
            f"{path} is not a PyTorch checkpoint that can be loaded safely (torch.load with "
            f"weights_only=True failed: {reason})"
        ) from error

    # Unwrap a checkpoint dict and remove the DataParallel prefix
    state_dict = _extract_state_dict(checkpoint, path)
    state_dict = {_strip_prefix(key): value for key, value in state_dict.items()}

    # Read the architecture from the keys
    num_blocks = _count_layer1_blocks(state_dict, path)
    if "linear.weight" not in state_dict:
        raise ValueError(f"state dict in {path} is not a CIFAR ResNet: 'linear.weight' is missing")
    num_classes = state_dict["linear.weight"].shape[0]

    # Load strictly, so a missing, extra or misshaped tensor raises
    model = CifarResNet(num_blocks, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"state dict in {path} does not match a CIFAR ResNet-{model.depth} "
            f"with {num_classes} classes: {error}"
        ) from error

    if isinstance(checkpoint, Mapping) and "best_prec1" in checkpoint:
        logger.info(
            "Loaded CIFAR ResNet-%d from %s (saved best_prec1 %s)",
            model.depth,
            path,
            checkpoint["best_prec1"],
        )
    else:
        logger.info("Loaded CIFAR ResNet-%d from %s", model.depth, path)
    return model.eval()


def _extract_state_dict(checkpoint, path):
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{path} does not contain a state dict: expected a dict of tensors or a dict with "
            f"a 'state_dict' entry; got {type(state_dict).__name__}"
        )
    return state_dict


def _strip_prefix(key):
    if key.startswith(_DATA_PARALLEL_PREFIX):
        return key[len(_DATA_PARALLEL_PREFIX) :]
    return key


def _count_layer1_blocks(state_dict, path):
    indices = sorted(
        int(match.group(1))
        for match in map(_LAYER1_BLOCK_KEY.match, state_dict)
        if match is not None
    )
    if not indices:
        first_keys = ", ".join(list(state_dict)[:5])
        raise ValueError(
            f"state dict in {path} is not a CIFAR ResNet: no 'layer1.<i>.conv1.weight' keys "
            f"found; the first keys are: {first_keys}"
        )
    if indices != list(range(len(indices))):
        raise ValueError(
            f"state dict in {path} is not a CIFAR ResNet: the layer1 block indices "
            f"{indices} are not numbered 0 to {len(indices) - 1}"
        )
    return len(indices)
