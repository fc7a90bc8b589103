"""Merged label numbering, argmax merging and the quadrant split, against hand-built expectations.

The expected label lists and maps below are written out by hand from the spec
(1.7.4-1.7.7); the quadrant split is checked against a pure-Python re-statement
of the original (BFS connected components numbered in raster order of their
first pixel, like skimage, then the original's loop over labels 1..num-1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import reference_quad
from jaxdissect.segmentation import labels as L
from jaxdissect.segmentation.quad import component_roots, quad_split

merge_upp = jax.jit(L.merge_upp, static_argnums=(3, 4))
merge_color = jax.jit(L.merge_color, static_argnums=(1,))

# Objects 1 wall, 2 sky, 3 door, 4 building, 5 person, 6 window; object_part keys deliberately
# NOT in object-number order, so groups must be matched by object number.
UPP_JSON = {
    "object": ["-", "wall", "sky", "door", "building", "person", "window"],
    "material": ["-", "wood", "glass"],
    "scene": ["a", "b"],
    "part": ["-", "door", "window", "roof", "head", "arm", "cloud"],
    "object_part": {
        "person": ["-", "head", "arm"],
        "building": ["-", "door", "window", "roof"],
        "sky": ["-", "cloud"],
        "wall": ["door", "head"],
    },
}
N_OBJ = 6


def test_parse_setting():
    s = L.parse_setting("netpqc")
    assert (s.all_parts, s.quad, s.color) == (True, True, True)
    s = L.parse_setting("net")
    assert (s.all_parts, s.quad, s.color) == (False, False, False)
    assert L.parse_setting("netc").color and not L.parse_setting("netc").quad
    for bad, words in [("netpqxc", "texture"), ("netz", "unknown"), ("upp", "'net'"), ("netpp", "repeated")]:
        with pytest.raises(L.LabelError, match=words):
            L.parse_setting(bad)


def test_upp_numbering_all_parts_quad():
    t = L.upp_labels(UPP_JSON, all_parts=True, quad=True)
    objs = UPP_JSON["object"][1:]
    expected = (["-"] + objs + [f"{o}-t" for o in objs] + [f"{o}-l" for o in objs]
                + [f"{o}-b" for o in objs] + [f"{o}-r" for o in objs]
                # walking person, building, sky, wall: new names head, arm, roof, cloud
                + ["wood", "glass", "head", "arm", "roof", "cloud"])
    assert list(t.names) == expected
    assert list(t.label_categories) == (["object"] * 7 + ["part"] * 24 + ["material"] * 2
                                        + ["part"] * 4)
    first_part = 5 * N_OBJ + 2 + 1  # 33
    assert t.material_offset == 30
    assert t.owners == (5, 4, 2, 1)
    # Decoder groups in object-number order: wall(1), sky(2), building(4), person(5).
    assert t.part_sizes == (2, 2, 4, 3)
    assert t.owner_groups == (3, 2, 1, 0)
    head, arm, roof, cloud = range(first_part, first_part + 4)
    assert t.part_translation == ((0, head, arm), (0, 3, 6, roof), (0, cloud), (3, head))


def test_upp_numbering_default_owners_no_quad():
    t = L.upp_labels(UPP_JSON, all_parts=False, quad=False)
    # Walk sky, building, person: cloud, roof, head, arm; materials right after objects.
    assert list(t.names) == UPP_JSON["object"] + ["wood", "glass", "cloud", "roof", "head", "arm"]
    assert t.owners == (2, 4, 5)
    assert t.part_translation == ((0, 9), (0, 3, 6, 10), (0, 11, 12))
    bad = dict(UPP_JSON, object_part={"person": ["-", "head"]})
    with pytest.raises(L.LabelError, match="sky"):
        L.upp_labels(bad, all_parts=False)
    with pytest.raises(L.LabelError, match="start with"):
        L.upp_labels(dict(UPP_JSON, object=["wall", "sky"]))


def _onehot_logits(index_map, n, noise_seed=0):
    """Logits whose argmax is ``index_map`` [N, h, w], with random lower scores elsewhere."""
    rng = np.random.default_rng(noise_seed)
    x = rng.uniform(-1, 0, size=index_map.shape + (n,)).astype(np.float32)
    np.put_along_axis(x, index_map[..., None], 3.0, axis=-1)
    return x


def test_merge_upp_hand_built():
    t = L.upp_labels(UPP_JSON, all_parts=True, quad=True)
    # One 4x6 image: left block person (5), right block building (4), bottom-right background.
    obj = np.array([[[5, 5, 4, 4, 4, 4],
                     [5, 5, 4, 4, 4, 4],
                     [5, 5, 1, 1, 0, 0],
                     [5, 5, 1, 1, 0, 0]]])
    mat = np.array([[[0, 1, 1, 2, 2, 0]] * 4])
    # Local part argmax per group (wall 2, sky 2, building 4, person 3 channels).
    local = {1: np.full(obj.shape, 1), 2: np.full(obj.shape, 1),
             4: np.array([[[0, 0, 1, 2, 3, 0]] * 4]), 5: np.array([[[1, 2, 0, 0, 0, 0]] * 4])}
    sizes = {1: 2, 2: 2, 4: 4, 5: 3}
    part = np.concatenate([_onehot_logits(local[o], sizes[o], o) for o in (1, 2, 4, 5)], -1)
    out = np.asarray(merge_upp(_onehot_logits(obj, 7), _onehot_logits(mat, 3), part, t))
    assert out.shape == (1, 5, 4, 6) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0, 0], obj[0])
    np.testing.assert_array_equal(out[0, 1], np.array([[0, 31, 31, 32, 32, 0]] * 4))
    head, arm, roof = 33, 34, 35
    # person pixels: head, arm; building: -, door(3), window(6), roof; wall: part 'head'.
    np.testing.assert_array_equal(out[0, 2], np.array([[head, arm, 3, 6, roof, 0],
                                                       [head, arm, 3, 6, roof, 0],
                                                       [head, arm, head, head, 0, 0],
                                                       [head, arm, head, head, 0, 0]]))
    # Components in raster order of first pixel: person, building, wall (last: not divided).
    tb = np.array([[5 + 6, 5 + 6, 4 + 6, 4 + 6, 4 + 6, 4 + 6],
                   [5 + 6, 5 + 6, 4 + 18, 4 + 18, 4 + 18, 4 + 18],
                   [5 + 18, 5 + 18, 0, 0, 0, 0],
                   [5 + 18, 5 + 18, 0, 0, 0, 0]])
    lr = np.array([[5 + 12, 5 + 24, 4 + 12, 4 + 12, 4 + 24, 4 + 24]] * 2
                  + [[5 + 12, 5 + 24, 0, 0, 0, 0]] * 2)
    np.testing.assert_array_equal(out[0, 3], tb)
    np.testing.assert_array_equal(out[0, 4], lr)
    fixed = np.asarray(merge_upp(_onehot_logits(obj, 7), _onehot_logits(mat, 3), part, t, False))
    np.testing.assert_array_equal(fixed[0, 3, 2:, 2:4], [[1 + 6, 1 + 6], [1 + 18, 1 + 18]])
    np.testing.assert_array_equal(fixed[0, 4, 2:, 2:4], [[1 + 12, 1 + 24]] * 2)
    with pytest.raises(L.LabelError, match="part scores"):
        L.merge_upp(_onehot_logits(obj, 7), _onehot_logits(mat, 3), part[..., :-1], t)


COLOR_JSON = {
    "labels": [
        {"name": "red", "category": "color"},
        {"name": "white", "category": "color"},
        {"name": "grey-internal", "category": "color", "internal": True},
        {"name": "red", "category": "color"},  # same name: same external number
        {"name": "shiny", "category": "gloss"},
        {"name": "matte", "category": "gloss"},
    ],
    "categories": [{"name": "color"}, {"name": "gloss", "mask": "white"}],
    "imageformat": {"byteorder": "BGR", "mean": [0.5, 0.5, 0.5], "stdev": [0.25, 0.25, 0.25]},
}


def test_color_labels_and_merge():
    c = L.color_labels(COLOR_JSON)
    assert c.names == ("-", "red", "white", "shiny", "matte")
    assert c.label_categories == ("-", "color", "color", "gloss", "gloss")
    assert c.category_channels == ((0, 1, 2, 3), (4, 5))
    assert c.category_map == ((1, 2, 0, 1), (3, 4))
    assert c.masks == (None, (0, 1)) and c.segsizes == (256,)
    color_idx = np.array([[[0, 1, 2, 3]]])  # red, white, internal (0), red
    gloss_idx = np.array([[[1, 1, 0, 0]]])  # matte, matte, shiny, shiny
    scores = np.concatenate([_onehot_logits(color_idx, 4), _onehot_logits(gloss_idx, 2)], -1)
    out = np.asarray(merge_color(scores, c))
    np.testing.assert_array_equal(out[0, 0], [[1, 2, 0, 1]])
    np.testing.assert_array_equal(out[0, 1], [[0, 4, 0, 0]])  # gloss only where white wins
    # The original's per-category softmax keeps each category's argmax.
    soft = np.asarray(jax.jit(L.color_category_softmax, static_argnums=(1,))(scores, c))
    np.testing.assert_allclose(soft[..., :4].sum(-1), 1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(merge_color(soft, c)), out)
    with pytest.raises(L.LabelError, match="unknown label"):
        L.color_labels(dict(COLOR_JSON, categories=[{"name": "color", "mask": "nope"}]))


def test_merged_offsets_and_blank():
    m = L.merged_labels("netpqc", UPP_JSON, COLOR_JSON)
    upp_n = 1 + 5 * 6 + 2 + 4
    assert m.color_offset == upp_n
    assert m.label_names[upp_n:] == ("-", "red", "white", "shiny", "matte")
    assert m.label_categories[upp_n] == "-"
    assert m.categories == ("object", "part", "material", "color", "gloss")
    assert m.n_channels == 7
    cmap = jnp.array([[[[0, 1, 2]]]])
    np.testing.assert_array_equal(L.offset_color(cmap, m), [[[[0, upp_n + 1, upp_n + 2]]]])
    faithful = L.merged_labels("netpqc", UPP_JSON, COLOR_JSON, faithful_color_blank=True)
    np.testing.assert_array_equal(L.offset_color(cmap, faithful), [[[[upp_n, upp_n + 1, upp_n + 2]]]])
    assert L.label_category_pairs(m)[upp_n + 1] == ("red", "color")
    with pytest.raises(L.LabelError, match="colour"):
        L.merged_labels("netc", UPP_JSON, None)


# ----------------------------------------------------------------------------- quad reference


def _random_maps(rng, n, h, w, k):
    """Blobby label maps with many touching components (coarse noise, upsampled, some snakes)."""
    maps = rng.integers(0, k + 1, size=(n, h // 3 + 1, w // 3 + 1)).repeat(3, 1).repeat(3, 2)
    maps = maps[:, :h, :w].copy()
    maps[rng.random((n, h, w)) < 0.15] = 0
    # A one-pixel-wide serpentine (long path) in the first image.
    maps[0] = 0
    maps[0, ::2, :] = 7
    maps[0, 1::4, -1] = 7
    maps[0, 3::4, 0] = 7
    return maps


@pytest.mark.parametrize("quirk", [True, False])
def test_quad_matches_reference(quirk):
    rng = np.random.default_rng(1)
    maps = _random_maps(rng, 6, 19, 23, 4)
    tb, lr = jax.jit(quad_split, static_argnums=(1, 2))(jnp.asarray(maps), 8, quirk)
    roots = np.asarray(jax.jit(component_roots)(jnp.asarray(maps)))
    for i in range(len(maps)):
        ref_tb, ref_lr, comp = reference_quad(maps[i], 8, quirk)
        np.testing.assert_array_equal(np.asarray(tb[i]), ref_tb, err_msg=f"t/b image {i}")
        np.testing.assert_array_equal(np.asarray(lr[i]), ref_lr, err_msg=f"l/r image {i}")
        # Roots identify exactly the reference components.
        fg = maps[i] != 0
        pairs = set(zip(comp[fg].tolist(), roots[i][fg].tolist()))
        assert len(pairs) == comp.max() == len({r for _, r in pairs})
        assert (roots[i][~fg] == 19 * 23).all()


def test_merge_sharded_over_two_devices(tmp_path):
    """Merging + quadrants on a batch sharded over a 2-device mesh equals the unsharded result."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    rng = np.random.default_rng(2)
    obj = _random_maps(rng, 4, 12, 12, 6) % 7
    scores = {"obj": _onehot_logits(obj, 7), "mat": rng.normal(size=(4, 12, 12, 3)).astype(np.float32),
              "part": rng.normal(size=(4, 12, 12, 11)).astype(np.float32)}
    np.savez(tmp_path / "scores.npz", **scores)
    table = L.upp_labels(UPP_JSON, all_parts=True, quad=True)
    expected = np.asarray(merge_upp(scores["obj"], scores["mat"], scores["part"], table))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"""
        import json, jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxdissect.segmentation import labels as L
        table = L.upp_labels(json.loads({json.dumps(UPP_JSON)!r}))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        s = {{k: jax.device_put(v, NamedSharding(mesh, P("data")))
              for k, v in np.load({str(tmp_path / "scores.npz")!r}).items()}}
        out = jax.jit(lambda a, b, c: L.merge_upp(a, b, c, table))(s["obj"], s["mat"], s["part"])
        print(json.dumps({{"devices": len(out.sharding.device_set), "labels": np.asarray(out).tolist()}}))
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    np.testing.assert_array_equal(np.array(result["labels"]), expected)
