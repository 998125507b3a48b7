"""``histolens.explain_point``: one token's cross-scale attention, checked against a float64
per-token reference of the same MSA blocks, and painted on the right level-0 pixels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import histolens
from histolens.layers import explanation_to_layer_data
from histolens.region import Region
from histolens.slide._read import read_level_box

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn


from histolens.models import atlas as A  # noqa: E402
from histolens.models import create_model  # noqa: E402
from histolens.slide import Slide, open_slide  # noqa: E402
from histolens.slide._sample import sample_slide_path  # noqa: E402

torch.set_num_threads(2)

#: A point in the tissue of the sample slide (level-0 y, x). Its scale-0 window is (1, 1) of
#: the 4 x 4 in its 1024 px input, whose scale-1 parent (0) is not window // 4 (pitfall 1.8-1).
SAMPLE_POINT = (1040, 1552)


@pytest.fixture(scope="module")
def sample():
    return open_slide(sample_slide_path())


@pytest.fixture(scope="module")
def explained(sample, default_model):
    return histolens.explain_point(sample, SAMPLE_POINT, model=default_model, precision="fp32")


# -- a float64 per-token reference of the probed MSA blocks ------------------------------------


def _reference_query_weights(attend, msa, xs, layouts, row, col):
    """Top-down weights (heads, keys) of scale-0 token ``(row, col)`` in one MSA block, keys
    found by position (own window, then the window holding the token at each coarser scale,
    coarsest first); coarser tokens are updated first, one token at a time. ``attend`` is the
    ``attend_reference`` fixture."""
    n, g = len(xs), msa.g
    blocks = [msa.scales[min(s, len(msa.scales) - 1)] for s in range(n)]
    grids = [
        A.from_windows(x, 1, lay.h, lay.w, lay.mh, lay.mw)[0]
        for x, lay in zip(xs, layouts, strict=True)
    ]
    for s, lay in enumerate(layouts):
        pos = blocks[s].pos(A.window_coords(lay.mh, lay.mw, grids[s].device).double())
        pos = pos.reshape(lay.mh, lay.mw, -1).permute(2, 0, 1)
        grids[s] = grids[s] + pos.repeat(1, lay.h // lay.mh, lay.w // lay.mw)
    for s in range(n - 1):
        grids[s + 1] = grids[s + 1] + F.max_pool2d(grids[s][None], g)[0]

    def window(s, r, c):
        lay = layouts[s]
        r0, c0 = r // lay.mh * lay.mh, c // lay.mw * lay.mw
        return grids[s][:, r0 : r0 + lay.mh, c0 : c0 + lay.mw].reshape(grids[s].shape[0], -1).T

    def sources(s, r, c):
        out = [(blocks[s], window(s, r, c))]
        for t in range(n - 1, s, -1):
            out.append((blocks[t], window(t, r // g ** (t - s), c // g ** (t - s))))
        return out

    for s in range(n - 1, 0, -1):  # only the coarse window the query will read is updated
        lay = layouts[s]
        r, c = row // g**s, col // g**s
        r0, c0 = r // lay.mh * lay.mh, c // lay.mw * lay.mw
        x = window(s, r, c)  # its tokens, all reading the same windows as token (r, c)
        _, o = attend(blocks[s], x, sources(s, r, c))
        y = x + o
        y = y + blocks[s].mlp(blocks[s].norm2(y))
        grids[s] = grids[s].clone()
        grids[s][:, r0 : r0 + lay.mh, c0 : c0 + lay.mw] = y.T.reshape(-1, lay.mh, lay.mw)
    a, _ = attend(blocks[0], grids[0][:, row, col][None], sources(0, row, col))
    return a[0]


def test_weights_equal_a_float64_reference_and_sum_to_one(
    sample, default_model, explained, attend_reference
):
    e = explained
    assert [w.scale for w in e.scales] == [0, 1, 2]
    assert e.blocks == 3 and e.heads == 3  # atlas_tiny: 3 MSA blocks of 3 heads
    # every block and head: the weights over all keys the token can see sum to 1
    total = sum(w.weights.astype(np.float64).sum(axis=(-2, -1)) for w in e.scales)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert sum(e.shares().values()) == pytest.approx(1.0, abs=1e-5)
    # float64 reference on the same pixels (the analysis level is level 0 here: f = 1)
    net = default_model.backbone.__class__(default_model.backbone.cfg)
    net.load_state_dict(default_model.backbone.state_dict())
    net = net.double().eval()
    b = e.input_box
    rgb = read_level_box(sample.levels[0], b.y0, b.x0, b.y1, b.x1)
    x = default_model.preprocess(rgb[None]).double()
    captured = []
    hooks = [
        blk.register_forward_pre_hook(lambda m, args: captured.append((m, args[0], args[1])))
        for blk in net.stages[0]
    ]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()
        row = (e.token_box.y0 - b.y0) // 16
        col = (e.token_box.x0 - b.x0) // 16
        for layer, (msa, xs, layouts) in enumerate(captured):
            ref = _reference_query_weights(attend_reference, msa, xs, layouts, row, col).numpy()
            order = [e.scales[0], *sorted(e.scales[1:], key=lambda w: -w.scale)]
            got = np.concatenate([w.weights[layer].reshape(e.heads, -1) for w in order], -1)
            np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    # the windows nest and hold the token
    for w in e.scales:
        assert w.box.contains(e.token_box)
    assert e.scales[2].box == e.input_box  # the coarsest window is the whole 1024 px input


def test_sample_point_predictions_and_fields_of_view(explained):
    e = explained
    assert e.input_box.shape == (1024, 1024) and e.token_box.shape == (16, 16)
    fov = e.field_of_view_um()
    assert fov[0] == pytest.approx(256 * 0.499) and fov[2] == pytest.approx(1024 * 0.499)
    assert e.tissue_class in e.tissue_probabilities
    assert sum(e.tissue_probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    names = [m["name"] for _, m, _ in explanation_to_layer_data(e)]
    assert names == [
        "looked at (scale 2)",
        "looked at (scale 1)",
        "same scale",
        "explain windows",
    ]
    one_head = explanation_to_layer_data(e, head=1)[2][0]
    assert one_head.shape == (16, 16) and not np.allclose(
        one_head, explanation_to_layer_data(e)[2][0]
    )


def test_predictions_come_from_the_result_when_given(sample, default_model):
    region = Region(1024, 1536, 1280, 1792)  # exactly one 256 px tile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = histolens.analyze_region(
            sample, region, model=default_model, cache=False, precision="bf16"
        )
    nuc = result.nuclei.features.iloc[0]
    point = (round(nuc.centroid_y), round(nuc.centroid_x))
    e = histolens.explain_point(sample, point, result=result, model=default_model)
    assert e.model_name == "histolens-default"
    assert e.input_box.shape == (512, 512)  # one 256 px tile with its 128 px halo
    label = result.nuclei.labels[
        int(point[0] - result.nuclei.origin[0]), int(point[1] - result.nuclei.origin[1])
    ]
    row = result.nuclei.features.set_index("label").loc[label]
    assert e.nucleus_type == row.class_name
    assert e.nucleus_probability == pytest.approx(row.probability)
    assert e.tissue_class is not None


def test_other_atlas_models_explain_too(sample):
    """test-tiny: another Atlas layout (a 256 px tile alone, 2 scales, 2 heads, 1 block)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained weights: the layout is what is checked
        tiny = create_model("test-tiny", device="cpu")
    e = histolens.explain_point(sample, SAMPLE_POINT, model=tiny)
    assert [w.weights.shape for w in e.scales] == [(1, 2, 16, 16), (1, 2, 8, 8)]
    total = sum(w.weights.astype(np.float64).sum(axis=(-2, -1)) for w in e.scales)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert all(w.box.contains(e.token_box) for w in e.scales)


# -- bad input -----------------------------------------------------------------------------------


def test_point_outside_the_slide_names_point_and_bounds(sample, default_model):
    with pytest.raises(ValueError, match=r"point \(3000, 5\).*y in \[0, 2967\), x in \[0, 2220\)"):
        histolens.explain_point(sample, (3000, 5), model=default_model)
    with pytest.raises(ValueError, match="outside the analysed region"):
        histolens.explain_point(
            sample, (10, 10), model=default_model, region=Region(500, 500, 600, 600)
        )


def test_model_without_cross_scale_attention_is_refused(sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained weights: irrelevant to the refusal
        vit = create_model("pluto-s16", device="cpu")
    with pytest.raises(ValueError, match="has no cross-scale attention"):
        histolens.explain_point(sample, SAMPLE_POINT, model=vit)


# -- the painted coarse box lands on a bright patch far from the query -----------------------------


@pytest.fixture
def bright_seeking_model(brightness_atlas):
    """Every query is the constant channel, every key the brightness: each token attends to
    the brightest keys it can see, at every scale."""

    def weights(scale, blk, hd):
        for head in range(2):
            blk.q.weight[head * hd, 1] = 20.0
            blk.kv.weight[head * hd, 0] = 20.0

    return brightness_atlas(
        weights, name="bright-seeker", halo=128, description="attends to the brightest token"
    )


def test_painted_coarse_box_lands_on_the_bright_patch(bright_seeking_model):
    img = np.zeros((2048, 2048, 3), np.uint8)
    patch = Region(1280, 1280, 1344, 1344)  # one scale-2 token (64 px), ~700 px from the query
    img[patch.y0 : patch.y1, patch.x0 : patch.x1] = 255
    slide = Slide.from_array(img, mpp=0.5, name="bright patch")
    e = histolens.explain_point(slide, (800, 800), model=bright_seeking_model)
    assert e.input_box == Region(384, 384, 1408, 1408)
    layers = {m["name"]: (d, m) for d, m, _ in explanation_to_layer_data(e)}
    heat, meta = layers["looked at (scale 2)"]
    i, j = np.unravel_index(np.argmax(heat), heat.shape)
    assert heat[i, j] > 0.99  # nearly all of the token's attention on the patch's token
    # napari draws array pixel (i, j) centred at translate + scale * (i, j) (micrometres);
    # the slide layer has level-0 pixel k centred at k * mpp
    f = meta["scale"][0] / 0.5
    cy = (meta["translate"][0] + meta["scale"][0] * i) / 0.5
    cx = (meta["translate"][1] + meta["scale"][1] * j) / 0.5
    painted = Region(
        round(cy - (f - 1) / 2),
        round(cx - (f - 1) / 2),
        round(cy + (f + 1) / 2),
        round(cx + (f + 1) / 2),
    )
    assert painted == patch
    # the scale-1 window the query read does not hold the patch: no mass can go there
    assert not e.scales[1].box.contains(patch)
    assert e.shares()[2] > 0.99
