"""nn.MultiheadAttention / nn.TransformerEncoder in KFAC: factors equal those of a twin network whose
attention is written by hand with explicit nn.Linear q/k/v/out projections (copied weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marglik import KFAC
from marglik.curvature.layers import UnsupportedModuleError

TOL = dict(atol=1e-10, rtol=1e-10)


class ExplicitMHA(nn.Module):
    """Multi-head attention from nn.Linear projections, written from the definition (batch-first)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        E, H = mha.embed_dim, mha.num_heads
        self.E, self.H, self.batch_first = E, H, mha.batch_first
        has_b = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(E, E, bias=has_b)
        self.k_proj = nn.Linear(mha.kdim, E, bias=has_b)
        self.v_proj = nn.Linear(mha.vdim, E, bias=has_b)
        self.out_proj = nn.Linear(E, E, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                ws = mha.in_proj_weight.split(E)
            else:
                ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for lin, w in zip((self.q_proj, self.k_proj, self.v_proj), ws):
                lin.weight.copy_(w)
            if has_b:
                for lin, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.split(E)):
                    lin.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None):
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        N, L, _ = q.shape
        S = k.shape[1]
        H, d = self.H, self.E // self.H
        Q = self.q_proj(q).view(N, L, H, d).transpose(1, 2)
        K = self.k_proj(k).view(N, S, H, d).transpose(1, 2)
        V = self.v_proj(v).view(N, S, H, d).transpose(1, 2)
        scores = Q @ K.transpose(-1, -2) / math.sqrt(d)  # (N, H, L, S)
        if attn_mask is not None:
            scores = scores + _additive(attn_mask, scores)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores)[:, None, None, :]
        out = (scores.softmax(-1) @ V).transpose(1, 2).reshape(N, L, self.E)
        out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)


def _additive(mask, like):
    """A boolean mask (True: not allowed) as ``-inf`` / 0; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask


class AttnNet(nn.Module):
    """Linear embedding -> attention (self or cross) -> per-token or pooled head."""

    def __init__(self, attn: nn.Module, E: int, kdim: int, pool: bool, batch_first: bool, cross: bool) -> None:
        super().__init__()
        self.emb_q = nn.Linear(3, E)
        self.emb_kv = nn.Linear(3, kdim) if cross else None
        self.attn, self.pool, self.batch_first, self.cross = attn, pool, batch_first, cross
        self.head = nn.Linear(E, 4)

    def forward(self, x, masks=None):
        masks = masks or {}
        q = self.emb_q(x)
        kv = torch.tanh(self.emb_kv(x[:, :-1])) if self.cross else q  # cross: S = L - 1 keys
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        a = self.attn(q, kv, kv, **masks)
        a = a[0] if isinstance(a, tuple) else a
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(a.mean(1) if self.pool else a)


def _pair(batch_first=True, cross=False, kdim=None, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    E = 8
    mha = nn.MultiheadAttention(E, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout)
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.3)
        mha.out_proj.bias.normal_(0, 0.3)
    ours = AttnNet(mha, E, kdim or E, pool=False, batch_first=batch_first, cross=cross)
    twin = AttnNet(ExplicitMHA(mha), E, kdim or E, pool=False, batch_first=batch_first, cross=cross)
    twin.emb_q.load_state_dict(ours.emb_q.state_dict())
    twin.head.load_state_dict(ours.head.state_dict())
    if cross:
        twin.emb_kv.load_state_dict(ours.emb_kv.state_dict())
    return ours.double(), twin.double()


def _fit(model, X, y, approx, fisher, masks=None, seed=3):
    gen = torch.Generator().manual_seed(seed)
    kfac = KFAC(model, approx=approx, fisher_type=fisher, generator=gen, mc_samples=2)
    return kfac.fit(((X, masks) if masks else X, y))


def _blocks(kron):
    return {b.name: b for b in kron.blocks}


def _check_packed(ours, twin, name="attn"):
    o, t = _blocks(ours), _blocks(twin)
    blk = o[name]
    assert blk.groups == 3
    for g, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        tb = t[f"{name}.{proj}"]
        torch.testing.assert_close(blk.A[g], tb.A[0], **TOL)
        torch.testing.assert_close(blk.B[g], tb.B[0], **TOL)
    for n in o:
        if n != name:
            torch.testing.assert_close(o[n].A, t[n].A, **TOL) if hasattr(o[n], "A") else None
            torch.testing.assert_close(o[n].B, t[n].B, **TOL) if hasattr(o[n], "B") else None


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_explicit_linears(float64, approx, fisher, batch_first):
    ours, twin = _pair(batch_first=batch_first)
    X = torch.randn(5, 6, 3)
    y = torch.randint(0, 4, (5, 6))
    _check_packed(_fit(ours, X, y, approx, fisher), _fit(twin, X, y, approx, fisher))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_cross_attention_with_masks(float64, approx):
    ours, twin = _pair(cross=True, batch_first=False)
    X = torch.randn(4, 6, 3)
    y = torch.randint(0, 4, (4, 6))
    kpm = torch.zeros(4, 5)
    kpm[1, -2:] = float("-inf")
    kpm[3, 0] = -2.0
    am = torch.randn(6, 5) * 0.5
    masks = dict(key_padding_mask=kpm, attn_mask=am)
    with torch.no_grad():
        torch.testing.assert_close(ours(X, masks), twin(X, masks), **TOL)
    _check_packed(_fit(ours, X, y, approx, "type-2", masks), _fit(twin, X, y, approx, "type-2", masks))


def test_bool_attn_mask_and_need_weights(float64):
    ours, twin = _pair()
    X = torch.randn(3, 5, 3)
    y = torch.randint(0, 4, (3, 5))
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    masks = dict(attn_mask=causal)
    _check_packed(_fit(ours, X, y, "expand", "type-2", masks), _fit(twin, X, y, "expand", "type-2", masks))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kdim_vdim_separate_weights(float64, approx):
    ours, twin = _pair(cross=True, kdim=5)
    X = torch.randn(4, 6, 3)
    y = torch.randint(0, 4, (4, 6))
    ko, kt = _fit(ours, X, y, approx, "type-2"), _fit(twin, X, y, approx, "type-2").split_bias()
    o = _blocks(ko)
    t = {}
    for b in kt.blocks:  # split_bias keeps names: weight block first, bias block second
        t.setdefault(b.name, []).append(b)
    for g, p in enumerate("qkv"):
        tw, tb = t[f"attn.{p}_proj"]
        torch.testing.assert_close(o[f"attn.{p}"].A[0], tw.A[0], **TOL)
        torch.testing.assert_close(o[f"attn.{p}"].B[0], tw.B[0], **TOL)
        torch.testing.assert_close(o["attn.in_proj_bias"].B[g] * o["attn.in_proj_bias"].A[g], tb.B[0] * tb.A[0], **TOL)
    # the dense curvature in parameter order equals the twin's on the shared blocks
    assert ko.num_params == kt.num_params


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_is_unchanged_while_recording(float64, dropout):
    """The recording forward equals the module's own (train mode, add_zero_attn, key padding, a
    causal mask); with dropout for need_weights=True (the same code path, the same random
    numbers), and the module is restored afterwards."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True, add_zero_attn=True).double()
    x = torch.randn(3, 5, 8)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, -1] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    kfac = KFAC(mha, likelihood="regression")
    for need_weights in ((True, False) if dropout == 0 else (True,)):
        for mask in (None, causal):
            torch.manual_seed(1)
            ref = mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights, attn_mask=mask)
            with kfac.capture():
                torch.manual_seed(1)
                rec = mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights, attn_mask=mask)
            torch.testing.assert_close(rec[0], ref[0], atol=1e-12, rtol=1e-12)
            if need_weights:
                torch.testing.assert_close(rec[1], ref[1], atol=1e-12, rtol=1e-12)
            else:
                assert rec[1] is None and ref[1] is None
    assert "forward" not in mha.__dict__


def test_differentiable_factors_through_attention(float64):
    """KFAC(differentiable=True) back-propagates through the attention twice (augmentation learning)."""
    ours, _ = _pair()
    X = torch.randn(3, 5, 3, requires_grad=True)
    y = torch.randint(0, 4, (3, 5))
    kron = KFAC(ours, differentiable=True).fit((X, y))
    (g,) = torch.autograd.grad(sum(b.B.sum() for b in kron.blocks), X)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_add_bias_kv_is_an_error():
    with pytest.raises(UnsupportedModuleError, match="add_bias_kv"):
        KFAC(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def _encoder_twin(enc: nn.TransformerEncoder) -> nn.Module:
    class Layer(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.self_attn = ExplicitMHA(layer.self_attn)
            self.linear1, self.linear2 = layer.linear1, layer.linear2
            self.norm1, self.norm2 = layer.norm1, layer.norm2

        def forward(self, x, key_padding_mask=None):
            x = self.norm1(x + self.self_attn(x, x, x, key_padding_mask=key_padding_mask))
            return self.norm2(x + self.linear2(F.relu(self.linear1(x))))

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer(lay) for lay in enc.layers)

        def forward(self, x, src_key_padding_mask=None):
            for lay in self.layers:
                x = lay(x, src_key_padding_mask)
            return x

    return Enc()


class EncNet(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.emb, self.enc, self.head = nn.Linear(3, 8), enc, nn.Linear(8, 4)

    def forward(self, x, masks=None):
        return self.head(self.enc(self.emb(x), **(masks or {})).mean(1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc"])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_matches_explicit_twin(float64, approx, fisher, train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True: the eval fast path must stay off
    ours = EncNet(enc).double()
    twin = EncNet(_encoder_twin(enc)).double()
    twin.emb, twin.head = ours.emb, ours.head
    ours.train(train), twin.train(train)
    X = torch.randn(5, 6, 3)
    y = torch.randint(0, 4, (5,))
    kpm = torch.zeros(5, 6, dtype=torch.bool)
    kpm[2, -2:] = True
    masks = dict(src_key_padding_mask=kpm)
    fast = torch.backends.mha.get_fastpath_enabled()
    ko, kt = _fit(ours, X, y, approx, fisher, masks), _fit(twin, X, y, approx, fisher, masks)
    assert torch.backends.mha.get_fastpath_enabled() == fast  # restored after recording
    o, t = _blocks(ko), _blocks(kt)
    for i in range(2):
        _check_packed_pair(o, t, f"enc.layers.{i}.self_attn")
    for n, b in o.items():
        if n in t:
            for attr in ("A", "B", "blocks"):
                if hasattr(b, attr):
                    torch.testing.assert_close(getattr(b, attr), getattr(t[n], attr), **TOL)
    assert len(o) == len(t) - 4  # q/k/v of two layers are one packed block each


def _check_packed_pair(o, t, name):
    for g, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(o[name].A[g], t[f"{name}.{proj}"].A[0], **TOL)
        torch.testing.assert_close(o[name].B[g], t[f"{name}.{proj}"].B[0], **TOL)


def test_reduce_differs_from_expand_negative_control(float64):
    """Per-token loss: expand and reduce give different q factors (the comparison can fail)."""
    ours, _ = _pair()
    X = torch.randn(5, 6, 3)
    y = torch.randint(0, 4, (5, 6))
    e, r = _fit(ours, X, y, "expand", "type-2"), _fit(ours, X, y, "reduce", "type-2")
    assert not torch.allclose(_blocks(e)["attn"].B, _blocks(r)["attn"].B, atol=1e-6)


def test_decoder_layer_records_in_train_and_eval(float64):
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec, self.head = dec, nn.Linear(8, 3)

        def forward(self, xm):
            x, m = xm[:, :4], xm[:, 4:]
            return self.head(self.dec(x, m).mean(1))

    net = Net().double()
    X, y = torch.randn(4, 9, 8), torch.randint(0, 3, (4,))
    k_train = KFAC(net).fit((X, y))
    net.eval()
    k_eval = KFAC(net).fit((X, y))
    names = [b.name for b in k_train.blocks]
    assert "dec.self_attn" in names and "dec.multihead_attn" in names and "dec.multihead_attn.out_proj" in names
    for a, b in zip(k_train.blocks, k_eval.blocks):
        torch.testing.assert_close(a.to_dense(), b.to_dense(), **TOL)
    # the cross attention's key/value inputs are the memory (5 tokens), its query the target (4)
    cross = _blocks(k_train)["dec.multihead_attn"]
    assert not torch.allclose(cross.A[0], cross.A[1])
    torch.testing.assert_close(cross.A[1], cross.A[2], **TOL)


def test_ignored_or_frozen_attention(float64):
    ours, twin = _pair()
    X = torch.randn(3, 5, 3)
    y = torch.randint(0, 4, (3, 5))
    names = [b.name for b in KFAC(ours, ignore_modules=[nn.MultiheadAttention]).fit((X, y)).blocks]
    assert names == ["emb_q", "head"]  # out_proj goes with its attention
    ours.attn.in_proj_weight.requires_grad_(False)
    ours.attn.in_proj_bias.requires_grad_(False)
    twin.attn.q_proj.requires_grad_(False), twin.attn.k_proj.requires_grad_(False), twin.attn.v_proj.requires_grad_(False)
    ko, kt = KFAC(ours).fit((X, y)), KFAC(twin).fit((X, y))
    assert [b.name for b in ko.blocks] == ["emb_q", "attn.out_proj", "head"]
    torch.testing.assert_close(ko.to_dense(), kt.to_dense(), **TOL)
