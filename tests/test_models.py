"""Shapes, invariant 5-d forward, parameter layout and counts of the model zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marglik.curvature.sharing import current_example_index
from marglik.models import GNN, MLP, SmallCNN, TorchvisionViT, ViT, WideResNet, get_model
from marglik.models.vit import UNCOVERED_MODULES
from marglik.nn import Bias, Scale

COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._NormBase, nn.LayerNorm,
           nn.GroupNorm, Bias, Scale)


def _image_models():
    return {
        "mlp": lambda: MLP(3 * 8 * 8, 5, hidden=(16, 16)),
        "mlp_relu": lambda: MLP(3 * 8 * 8, 5, hidden=(16,), activation="relu"),
        "cnn": lambda: SmallCNN(3, 5, width=4, hidden=8),
        "wrn_fixup": lambda: WideResNet(10, 1, 5, 3, norm="fixup"),
        "wrn_bn": lambda: WideResNet(10, 1, 5, 3, norm="batchnorm"),
        "wrn_none": lambda: WideResNet(10, 1, 5, 3, norm="none"),
        "vit_conv_mean": lambda: ViT(8, 2, 3, 5, dim=16, depth=1, heads=2, mlp_dim=16),
        "vit_linear_cls": lambda: ViT(8, 4, 3, 5, dim=16, depth=2, heads=4, mlp_dim=8, pool="cls", patch_embed="linear"),
        "tv_vit": lambda: TorchvisionViT(8, 3, 5, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16),
    }


def _randomise(model: nn.Module) -> None:
    """Fixup/zero inits make outputs constant; perturb all parameters so tests are meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("name", list(_image_models()))
def test_image_model_shapes_and_invariant_forward(name):
    torch.manual_seed(0)
    model = _image_models()[name]().double().eval()
    _randomise(model)
    x = torch.randn(4, 3, 3, 8, 8, dtype=torch.float64)  # (N, S, C, H, W)
    assert model(x[:, 0]).shape == (4, 5)
    out = model(x)
    assert out.shape == (4, 5)
    separate = torch.stack([model(x[:, s]) for s in range(3)], dim=1).mean(1)
    torch.testing.assert_close(out, separate)
    # example-major flattening: row n*S + s is copy s of example n
    torch.testing.assert_close(model(x.reshape(12, 3, 8, 8)).reshape(4, 3, 5).mean(1), out)


@pytest.mark.parametrize("name", list(_image_models()))
def test_parameters_live_in_covered_modules(name):
    model = _image_models()[name]()
    if name == "tv_vit":  # nn.MultiheadAttention and raw class_token / pos_embedding (tests/test_vit.py)
        from marglik.curvature.layers import find_rule

        assert all(find_rule(m) is not None for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
        return
    for mod_name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            assert isinstance(mod, COVERED + UNCOVERED_MODULES), (mod_name, type(mod))
    if name.startswith("vit"):
        uncovered = [m for m in model.modules() if isinstance(m, UNCOVERED_MODULES)]
        assert all(set(dict(m.named_parameters(recurse=False))) == {"weight"} for m in uncovered)
        assert len(uncovered) == (2 if "cls" in name else 1)


def test_fixup_and_none_module_types():
    fixup = WideResNet(16, 4, 10, 3, norm="fixup")
    holders = {type(m) for m in fixup.modules() if any(True for _ in m.parameters(recurse=False))}
    assert holders == {nn.Conv2d, nn.Linear, Bias, Scale}
    assert all(m.weight.numel() == 1 for m in fixup.modules() if isinstance(m, Scale))
    assert all(m.bias.numel() == 1 for m in fixup.modules() if isinstance(m, Bias))
    plain = WideResNet(16, 4, 10, 3, norm="none")
    holders = {type(m) for m in plain.modules() if any(True for _ in m.parameters(recurse=False))}
    assert holders == {nn.Conv2d, nn.Linear}
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


def _wrn_param_count(depth: int, k: int, num_classes: int, in_ch: int = 3) -> int:
    """Independent count of the standard (BatchNorm) WRN-d-k."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 9 * in_ch * 16  # stem conv, no bias
    for i in range(3):
        cin, cout = widths[i], widths[i + 1]
        for j in range(n):
            c = cin if j == 0 else cout
            total += 2 * c + 9 * c * cout + 2 * cout + 9 * cout * cout  # bn1, conv1, bn2, conv2
            if c != cout or (j == 0 and i > 0):
                total += c * cout  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes  # final bn, fc


def test_wrn16_4_parameter_count():
    model = get_model("wrn16_4", 3, 10, 32, norm="batchnorm")
    count = sum(p.numel() for p in model.parameters())
    assert count == _wrn_param_count(16, 4, 10) == 2_748_890  # the published ~2.7M
    fixup = get_model("wrn16_4", 3, 10, 32)  # Fixup: no BN, 5 scalars per block + 2
    n_scalars = sum(p.numel() for m in fixup.modules() if isinstance(m, (Bias, Scale)) for p in m.parameters())
    n_bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert n_scalars == 5 * 6 + 2
    assert sum(p.numel() for p in fixup.parameters()) == count - n_bn + n_scalars


def test_wrn_fixup_init_and_any_input_size():
    model = WideResNet(16, 4, 10, 3, norm="fixup")
    assert torch.all(model.fc.weight == 0) and torch.all(model.fc.bias == 0)
    for blk in [*model.block1, *model.block2, *model.block3]:
        assert torch.all(blk.conv2.weight == 0)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.all(out == 0)
    small = WideResNet(10, 2, 7, 1, norm="batchnorm", dropout=0.3)
    assert small(torch.randn(3, 1, 12, 12)).shape == (3, 7)
    with pytest.raises(ValueError):
        WideResNet(15, 4)


def test_wrn_fixup_trains():
    torch.manual_seed(0)
    model = WideResNet(10, 1, 2, 1, norm="fixup")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_get_model():
    assert isinstance(get_model("mlp", 1, 10, 8), MLP)
    assert isinstance(get_model("cnn", 1, 10, 8, width=4), SmallCNN)
    vit = get_model("vit", 1, 10, 8)
    assert isinstance(vit, TorchvisionViT) and vit(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="divisible"):
        get_model("vit", 1, 10, 8, patch_size=3)
    assert get_model("mlp", 1, 10, 8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError):
        get_model("resnet", 1, 10, 8)


def _random_graphs(sizes, feat=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, edges, batch, offset = [], [], [], 0
    for i, n in enumerate(sizes):
        xs.append(torch.randn(n, feat, generator=g, dtype=torch.float64))
        src, dst = torch.triu_indices(n, n, 1)
        keep = torch.rand(src.shape[0], generator=g) < 0.5
        src, dst = src[keep] + offset, dst[keep] + offset
        edges.append(torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]))
        batch.append(torch.full((n,), i))
        offset += n
    return torch.cat(xs), torch.cat(edges, 1), torch.cat(batch)


@pytest.mark.parametrize("readout", ["mean", "sum"])
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_gnn_shape_and_node_permutation_invariance(readout, aggregation):
    torch.manual_seed(0)
    model = GNN(3, 16, 4, num_layers=3, readout=readout, aggregation=aggregation).double()
    x, ei, batch = _random_graphs([5, 3, 7])
    out = model(x, ei, batch)
    assert out.shape == (3, 4)
    torch.testing.assert_close(model(x, ei, batch, num_graphs=3), out)
    # relabel all nodes by a random permutation (mixes graphs' node order in the stack too)
    perm = torch.randperm(x.shape[0])  # new node i is old node perm[i]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    out_p = model(x[perm], inv[ei], batch[perm])
    torch.testing.assert_close(out_p, out)
    # empty trailing graph ids are allowed with num_graphs
    assert model(x, ei, batch, num_graphs=5).shape == (5, 4)


def test_gnn_sets_example_index():
    model = GNN(3, 8, 2)
    x, ei, batch = _random_graphs([4, 6])
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, inp: seen.append(current_example_index()))
    model.head.register_forward_pre_hook(lambda m, inp: seen.append(current_example_index()))
    model(x.float(), ei, batch)
    assert all(s is batch for s in seen) and len(seen) == 2
    assert current_example_index() is None
    assert {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))} == {nn.Linear}
