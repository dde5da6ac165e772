"""``model=tv:<arch>``: any torchvision classifier by name, adapted to the data, with one-line errors."""

from __future__ import annotations

import pytest
import torch
from test_cli import _marglik
from torch import nn

import marglik
from marglik.cli_config import check_overrides, expand_model_shorthand
from marglik.errors import UserError
from marglik.models import ModelCannotRunError, TorchvisionClassifier, UnknownModelError, get_model
from marglik.tuning.backends import check_backend_runs
from marglik.tuning.config import CurvatureConfig


def test_shorthand_expands_to_the_group_and_its_arch():
    assert expand_model_shorthand(["model=tv:resnet18", "data=digits"]) == ["model=tv", "model.arch=resnet18",
                                                                              "data=digits"]
    assert expand_model_shorthand(["model=cnn", "model.width=3"]) == ["model=cnn", "model.width=3"]
    cfg = check_overrides(expand_model_shorthand(["model=tv:convnext_tiny"]))
    assert cfg.model.name == "tv" and cfg.model.kwargs == {"arch": "convnext_tiny"}


def test_one_channel_data_gets_a_one_channel_stem():
    torch.manual_seed(0)
    model = get_model("tv", in_channels=1, num_classes=4, image_size=32, arch="squeezenet1_1")
    assert isinstance(model, TorchvisionClassifier) and model.stem == "features.0"
    stem = model.net.features[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (1, 64, (3, 3), (2, 2))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert model(torch.randn(2, 3, 1, 32, 32)).shape == (2, 4)  # augmented copies, averaged
    kept = get_model("tv", in_channels=3, num_classes=4, image_size=32, arch="squeezenet1_1")
    assert kept.stem is None


def test_unknown_name_and_a_model_that_cannot_run_are_user_errors():
    with pytest.raises(UnknownModelError, match="model tv:resnet19: not a torchvision classifier"):
        TorchvisionClassifier("resnet19")
    with pytest.raises(ModelCannotRunError, match=r"squeezenet1_0' cannot run on \(1, 8, 8\) images: module "
                       r"'features\.\d+' \(MaxPool2d\) failed"):
        TorchvisionClassifier("squeezenet1_0", in_channels=1, image_size=8)
    assert issubclass(ModelCannotRunError, UserError) and issubclass(UnknownModelError, UserError)


def test_uncovered_module_fails_before_training_as_a_user_error():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.table = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.lin(x) + self.table[:2]

    with pytest.raises(marglik.UnsupportedModuleError, match="module '<root>' of type Raw") as info:
        check_backend_runs(CurvatureConfig(), Raw(), (torch.randn(2, 2), torch.zeros(2, dtype=torch.long)))
    assert isinstance(info.value, UserError)


def test_cli_model_that_cannot_run_exits_2_naming_the_module(tmp_path):
    proc = _marglik(["model=tv:squeezenet1_0", "data=digits", "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("marglik: error: torchvision model 'squeezenet1_0' cannot run on (1, 8, 8) images: "
                           "module 'features."), last
