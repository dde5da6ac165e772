"""Any torchvision classifier by name (``model=tv:<name>`` in the CLI), random init, fitted to the data.

``torchvision.models.get_model(arch, weights=None, num_classes=...)`` -- torchvision's own
network, nothing downloaded -- with two adaptations to the data:

* **input channels**: when the data do not have 3 channels (1-channel digits, MNIST), the
  network's *first* ``nn.Conv2d`` in module order (the stem, which every torchvision classifier
  applies to the image) is replaced by an ``nn.Conv2d`` with ``in_channels`` inputs and otherwise
  the same arguments (kernel, stride, padding, groups, bias), initialised by PyTorch's default
  rule. The rest of the network is untouched.
* **image size**: architectures that take it as an argument (``vit_*``: ``image_size``) get the
  data's; the others are fully convolutional or pool adaptively.

The network is probed at construction with one forward pass on zeros of the data's shape in eval
mode; an architecture that cannot run on such images raises :class:`ModelCannotRunError` naming
the innermost module whose forward failed.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ..compat import check_torchvision
from ..errors import UserError, one_line
from ._base import ImageClassifier

__all__ = ["TorchvisionClassifier", "torchvision_classifiers", "ModelCannotRunError", "UnknownModelError"]

_IMAGE_SIZE_ARG = ("vit_",)


class UnknownModelError(UserError, ValueError):
    """A name that is not one of torchvision's classification architectures."""


class ModelCannotRunError(UserError, RuntimeError):
    """A torchvision architecture whose forward pass fails on the data's images."""


def torchvision_classifiers() -> List[str]:
    """The names of torchvision's classification architectures (``torchvision.models.list_models``)."""
    check_torchvision()
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(net: nn.Module, in_channels: int) -> Optional[str]:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return None
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            groups=1, bias=m.bias is not None, padding_mode=m.padding_mode)
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], new)
            return name
    return None


def _probe(net: nn.Module, x: Tensor, arch: str) -> None:
    """One eval-mode forward; on failure, a :class:`ModelCannotRunError` naming the innermost failing module."""
    names = {id(m): n for n, m in net.named_modules()}
    stack: List[str] = []
    failed: List[str] = []

    def pre(mod, args):
        stack.append(names.get(id(mod), "?"))

    def post(mod, args, out):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in net.modules()]
    handles += [m.register_forward_hook(post) for m in net.modules()]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(x)
    except Exception as err:  # any failure of the architecture on these images
        failed.append(stack[-1] if stack else "")
        where = f"module {failed[0]!r} ({type(net.get_submodule(failed[0])).__name__})" if failed[0] else "its forward"
        raise ModelCannotRunError(
            f"torchvision model {arch!r} cannot run on {tuple(x.shape[1:])} images: {where} failed with "
            f"{type(err).__name__}: {one_line(str(err))[:200]}; choose another model or data.upsample"
        ) from err
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)


class TorchvisionClassifier(ImageClassifier):
    """A torchvision classification architecture, random init, on ``(N, C, H, W)`` / ``(N, S, C, H, W)``.

    Args:
        arch: a name of :func:`torchvision_classifiers` (``resnet18``, ``convnext_tiny``, ...).
        in_channels: image channels (the stem convolution is replaced when not 3; module docstring).
        num_classes: outputs.
        image_size: input height = width (passed to architectures that take it; used for the probe).

    Raises:
        UnknownModelError: ``arch`` is not a torchvision classifier.
        ModelCannotRunError: the network's forward fails on such images (the message names the module).
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        names = torchvision_classifiers()
        if arch not in names:
            raise UnknownModelError(
                f"model tv:{arch}: not a torchvision classifier; choose one of {', '.join(names)}"
            )
        import torchvision

        kwargs = {"image_size": image_size} if arch.startswith(_IMAGE_SIZE_ARG) else {}
        try:
            net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except (ValueError, AssertionError, TypeError) as err:
            raise ModelCannotRunError(
                f"torchvision model {arch!r} cannot be built for {image_size}x{image_size} images: "
                f"{one_line(str(err))[:200]}; choose another model or data.upsample"
            ) from err
        self.arch = arch
        self.stem = _replace_first_conv(net, in_channels)  #: the replaced convolution's name (None: kept)
        self.net = net
        _probe(net, torch.zeros(2, in_channels, image_size, image_size), arch)

    def forward_single(self, x: Tensor) -> Tensor:
        return self.net(x)
