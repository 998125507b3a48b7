"""Atlas MSA: scale layouts, spatial parent windows, a per-token reference, attention alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histolens.models import atlas as A
from histolens.models._model import HistoLensModel

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------
# Layouts and the parent-window gather
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("px", "g", "expected"),
    [
        (1024, 4, 2),
        (2048, 4, 3),
        (4096, 4, 3),
        (1024, 2, 3),
        (256, 2, 2),
        (256, 4, 2),
        (4096, 2, 5),
    ],
)
def test_number_of_scales(px, g, expected):
    # Atlas-B (g=4) numbers are models.md 1.4's table; small inputs still get 2 scales.
    h = px // 16
    assert A.num_scales(h, h, 16, g) == expected


def _pixel_box(lay: A.ScaleLayout, index: int) -> tuple[int, int, int, int]:
    r, c = divmod(index, lay.gw)
    s = lay.stride
    return r * lay.mh * s, c * lay.mw * s, (r + 1) * lay.mh * s, (c + 1) * lay.mw * s


def _naive_parent(fine: A.ScaleLayout, coarse: A.ScaleLayout, batch: int) -> torch.Tensor:
    """The reference code's mapping (repeat_interleave in raster order): pitfall 1.8-1."""
    r = fine.n_windows // coarse.n_windows
    return torch.arange(batch * coarse.n_windows).repeat_interleave(r)


@pytest.mark.parametrize("px", [2048, 4096])
@pytest.mark.parametrize("g", [2, 4])
def test_parent_window_contains_child(px, g):
    """Brute force: every fine window's gathered parent contains it, for every scale pair."""
    h = px // 16
    n = A.num_scales(h, h, 16, g)
    layouts = A.scale_layouts(*A.padded_grid(h, h, 16, g, n), 16, g, n)
    batch = 2
    naive_wrong = 0
    for s in range(n):
        for t in range(s + 1, n):
            fine, coarse = layouts[s], layouts[t]
            idx = A.parent_window_index(fine, coarse, batch)
            assert idx.shape == (batch * fine.n_windows,)
            naive = _naive_parent(fine, coarse, batch)
            for i in range(batch * fine.n_windows):
                b, w = divmod(i, fine.n_windows)
                pb, pw = divmod(int(idx[i]), coarse.n_windows)
                assert pb == b, "a window must read its own image's coarse window"
                fy0, fx0, fy1, fx1 = _pixel_box(fine, w)
                cy0, cx0, cy1, cx1 = _pixel_box(coarse, pw)
                assert cy0 <= fy0 and cx0 <= fx0 and fy1 <= cy1 and fx1 <= cx1, (s, t, w, pw)
                nb, nw = divmod(int(naive[i]), coarse.n_windows)
                ny0, nx0, ny1, nx1 = _pixel_box(coarse, nw)
                naive_wrong += not (ny0 <= fy0 and nx0 <= fx0 and fy1 <= ny1 and fx1 <= nx1)
    if any(layouts[t].n_windows > 1 for t in range(1, n)):
        # The test can fail: the raster-order mapping is wrong here, as models.md 1.8-1 reports.
        assert naive_wrong > 0


def test_pitfall_counts_match_reference_simulation():
    # models.md 1.8-1: with Atlas-B layouts the naive mapping misplaces 32/64 S0 windows at 2048 px.
    h = 2048 // 16
    layouts = A.scale_layouts(h, h, 16, 4, 3)
    fine, coarse = layouts[0], layouts[1]
    naive = _naive_parent(fine, coarse, 1)
    right = A.parent_window_index(fine, coarse, 1)
    assert int((naive != right).sum()) == 32


def test_windows_roundtrip():
    x = torch.randn(2, 5, 32, 48)
    w = A.to_windows(x, 16, 16)
    assert w.shape == (2 * 6, 256, 5)
    assert torch.equal(A.from_windows(w, 2, 32, 48, 16, 16), x)
    # Window 1 of image 0 is the top row, second column.
    assert torch.equal(w[1].T.reshape(5, 16, 16), x[0, :, :16, 16:32])


# ------------------------------------------------------------------------------------------
# A slow per-token reference of one MSA block
# ------------------------------------------------------------------------------------------
def _msa_reference(
    attend, block: A.MSABlock, grids: list[torch.Tensor], window: int, g: int
) -> list[torch.Tensor]:
    """Per-token MSA on spatial grids (C, h_s, w_s), keys found by position; ``attend`` is the
    ``attend_reference`` fixture."""

    def attend_one(blk: A.ScaleBlock, xq: torch.Tensor, keys) -> torch.Tensor:
        return attend(blk, xq[None], keys)[1][0]

    n = len(grids)
    blocks = [block.scales[min(s, len(block.scales) - 1)] for s in range(n)]
    grids = [x.clone() for x in grids]

    def win(s: int) -> tuple[int, int]:
        return (window, window) if s < n - 1 else tuple(grids[s].shape[1:])

    for s in range(n):
        mh, mw = win(s)
        coords = A.window_coords(mh, mw, grids[s].device).to(grids[s].dtype).reshape(mh, mw, 2)
        pos = blocks[s].pos(coords).permute(2, 0, 1)  # (C, mh, mw)
        grids[s] = grids[s] + pos.repeat(1, grids[s].shape[1] // mh, grids[s].shape[2] // mw)
    for s in range(n - 1):
        grids[s + 1] = grids[s + 1] + F.max_pool2d(grids[s][None], g)[0]

    def window_tokens(s: int, r: int, c: int) -> torch.Tensor:
        mh, mw = win(s)
        r0, c0 = (r // mh) * mh, (c // mw) * mw
        return grids[s][:, r0 : r0 + mh, c0 : c0 + mw].reshape(grids[s].shape[0], -1).T

    for s in range(n - 1, -1, -1):
        _, h, w = grids[s].shape
        new = grids[s].clone()
        for r in range(h):
            for c in range(w):
                keys = [(blocks[s], window_tokens(s, r, c))]
                for t in range(n - 1, s, -1):
                    f = g ** (t - s)
                    keys.append((blocks[t], window_tokens(t, r // f, c // f)))
                new[:, r, c] = grids[s][:, r, c] + attend_one(blocks[s], grids[s][:, r, c], keys)
        grids[s] = new + blocks[s].mlp(blocks[s].norm2(new.permute(1, 2, 0))).permute(2, 0, 1)
    for s in range(1, n):
        _, h, w = grids[s].shape
        new = grids[s].clone()
        for r in range(h):
            for c in range(w):
                keys = [(blocks[s - 1], window_tokens(s - 1, r * g, c * g))]
                new[:, r, c] = grids[s][:, r, c] + attend_one(blocks[s], grids[s][:, r, c], keys)
        grids[s] = new + blocks[s].mlp(blocks[s].norm2(new.permute(1, 2, 0))).permute(2, 0, 1)
    return grids


@pytest.mark.parametrize("want_attention", [False, True])
def test_msa_block_matches_per_token_reference(want_attention, attend_reference):
    """16x16 tokens, 4x4 windows, g=2: 3 scales, the middle one 2x2 windows (the pitfall case)."""
    torch.manual_seed(0)
    window, g = 4, 2
    cfg = A.AtlasConfig(
        stem_features=4, heads=2, depths=(1,), window=window, g=g, pos_hidden=8, scale_blocks=3
    )
    block = A.MSABlock(cfg.dim, cfg.heads, cfg).double().eval()
    h = 16
    n = A.num_scales(h, h, window, g)
    assert n == 3
    layouts = A.scale_layouts(h, h, window, g, n)
    assert layouts[1].n_windows == 4
    tokens = torch.randn(1, cfg.dim, h, h, dtype=torch.float64)
    grids = [F.max_pool2d(tokens, g**s)[0] if s else tokens[0] for s in range(n)]
    xs = [A.to_windows(x[None], lay.mh, lay.mw) for x, lay in zip(grids, layouts, strict=True)]
    with torch.no_grad():
        out, attn = block(xs, layouts, 1, want_attention)
        ref = _msa_reference(attend_reference, block, grids, window, g)
    for s in range(n):
        got = A.from_windows(out[s], 1, layouts[s].h, layouts[s].w, layouts[s].mh, layouts[s].mw)[0]
        torch.testing.assert_close(got, ref[s], rtol=1e-9, atol=1e-9)
    if want_attention:
        a0 = attn["top_down"][0]
        assert a0.shape == (16, 16, 16 + 16 + 16)  # own window + parent windows of S1 and S2
        torch.testing.assert_close(a0.sum(-1), torch.ones(16, 16, dtype=torch.float64))
        assert attn["bottom_up"][1].shape == (16, 4, 16)


def test_reference_catches_the_raster_order_bug(monkeypatch, attend_reference):
    """The per-token reference disagrees with a block that uses the naive parent mapping."""
    torch.manual_seed(1)
    cfg = A.AtlasConfig(
        stem_features=4, heads=2, depths=(1,), window=4, g=2, pos_hidden=8, scale_blocks=3
    )
    block = A.MSABlock(cfg.dim, cfg.heads, cfg).double().eval()
    layouts = A.scale_layouts(16, 16, 4, 2, 3)
    tokens = torch.randn(1, cfg.dim, 16, 16, dtype=torch.float64)
    grids = [F.max_pool2d(tokens, 2**s)[0] if s else tokens[0] for s in range(3)]
    xs = [A.to_windows(x[None], lay.mh, lay.mw) for x, lay in zip(grids, layouts, strict=True)]
    monkeypatch.setattr(A, "parent_window_index", _naive_parent)
    with torch.no_grad():
        out, _ = block(xs, layouts, 1)
        ref = _msa_reference(attend_reference, block, grids, 4, 2)
    got = A.from_windows(out[0], 1, 16, 16, 4, 4)[0]
    assert not torch.allclose(got, ref[0], atol=1e-6)


# ------------------------------------------------------------------------------------------
# The whole backbone
# ------------------------------------------------------------------------------------------
def test_backbone_shapes_with_padding():
    torch.manual_seed(0)
    net = A.Atlas(A.ATLAS_CONFIGS["atlas_test"]).eval()
    x = torch.randn(2, 3, 320, 192)  # 20 x 12 tokens: padded internally to 32 x 32
    with torch.no_grad():
        out = net(x, want_attention=True)
    assert [tuple(t.shape) for t in out["scales"]] == [(2, 32, 20, 12), (2, 32, 10, 6)]
    assert out["strides"] == [16, 32]
    assert {k: tuple(v.shape[-2:]) for k, v in out["pyramid"].items()} == {
        2: (160, 96),
        4: (80, 48),
        8: (40, 24),
        16: (20, 12),
    }
    maps = net.attention_maps(out, 2)
    assert set(maps) == {0} and maps[0].shape == (2, 20, 12)
    assert float(maps[0].min()) >= 0 and float(maps[0].max()) <= 1


def test_sdpa_and_explicit_paths_agree():
    torch.manual_seed(0)
    net = A.Atlas(A.ATLAS_CONFIGS["atlas_test"]).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        a = net(x)["scales"]
        b = net(x, want_attention=True)["scales"]
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


def test_reliance_mode_equals_explicit_weights():
    """The fused-kernel context reliance equals the one summed from the explicit weights, and
    the tokens are the same (atlas_small-like g=4 with scale dropping, and g=2)."""
    torch.manual_seed(0)
    for cfg in (
        A.ATLAS_CONFIGS["atlas_test"],
        A.AtlasConfig(
            stem_in=8, stem_features=8, heads=2, depths=(1, 1), g=4, pos_hidden=8, scale_blocks=3
        ),
    ):
        net = A.Atlas(cfg).eval()
        x = torch.randn(1, 3, 1024, 768)
        with torch.no_grad():
            full = net(x, want_attention=True)
            fused = net(x, want_attention="reliance")
        assert all("reliance" in blk for blk in fused["attention"])
        for u, v in zip(full["scales"], fused["scales"], strict=True):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
        a, b = A.context_reliance(full, 1), A.context_reliance(fused, 1)
        assert set(a) == set(b) and a
        for s in a:
            assert a[s].std() > 0  # not a constant map
            torch.testing.assert_close(a[s], b[s], rtol=1e-5, atol=1e-5)


def test_scale_dropping_keeps_every_scale_output():
    cfg = A.AtlasConfig(
        stem_in=8, stem_features=8, heads=2, depths=(1, 1), g=4, pos_hidden=8, scale_blocks=3
    )
    net = A.Atlas(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 1024, 1024), want_attention=True)
    assert [tuple(t.shape[-2:]) for t in out["scales"]] == [(64, 64), (16, 16)]
    # Stage 1 sees both scales; stage 2 only S1 (no cross-scale attention left): models.md 1.6.
    assert set(out["attention"][0]["top_down"]) == {0, 1}
    assert set(out["attention"][1]["top_down"]) == {1}


# ------------------------------------------------------------------------------------------
# Attention heatmaps land on the right pixels
# ------------------------------------------------------------------------------------------
@pytest.fixture
def predictable_model(brightness_atlas) -> HistoLensModel:
    """Queries = brightness; keys: coarsest scale +constant, finest scale -constant, S1 zero.

    A bright token's query then prefers the coarsest-scale keys (context reliance ~1) and a dark
    one its own scale's keys (~0): the heatmap must light up exactly where the bright patch is.
    """

    def weights(scale, blk, hd):
        for head in range(2):
            blk.q.weight[head * hd, 0] = 20.0
            if scale == 2:  # keys of the coarsest scale respond to the constant channel
                blk.kv.weight[head * hd, 1] = 20.0
            if scale == 0:  # ... and the finest scale's own keys the opposite way
                blk.kv.weight[head * hd, 1] = -20.0

    return brightness_atlas(weights, name="probe", halo=0, description="attention alignment probe")


def test_attention_heatmap_is_on_the_bright_patch(predictable_model):
    model = predictable_model
    img = np.zeros((1, 1024, 1024, 3), np.uint8)
    y0, x0 = (
        416,
        704,
    )  # a 32x32 px bright square: tokens (26..27, 44..45) at stride 16, (13, 22) at 32
    img[0, y0 : y0 + 32, x0 : x0 + 32] = 255
    out = model.predict_tiles(img, tasks=("attention",), precision="fp32")
    att = out["attention"]
    assert set(att) == {0, 1}
    for scale, stride in enumerate(model.card.attention_strides):
        m = att[scale][0]
        assert m.shape == (1024 // stride, 1024 // stride) and m.dtype == np.float32
        hot = np.argwhere(m > 0.5)
        # Map pixel (i, j) covers input pixels [i*stride, (i+1)*stride): exactly the bright square.
        ys, xs = hot[:, 0] * stride, hot[:, 1] * stride
        assert ys.min() == y0 and ys.max() + stride == y0 + 32, (scale, hot)
        assert xs.min() == x0 and xs.max() + stride == x0 + 32, (scale, hot)
        assert m.max() > 0.9 and np.median(m) < 0.05
