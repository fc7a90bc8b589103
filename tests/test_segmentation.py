"""End-to-end ``segment`` against the PyTorch reference segmenters plus a NumPy re-statement of the merge.

Random-weight checkpoints in the published key layout are converted with
``converters.segmenter``; the reference runs the PyTorch modules on the same
images, then merges their outputs the way the original ``segment_batch`` does
(written here from the spec, independently of ``jaxdissect.segmentation.labels``).
The integer label maps must be identical.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_segmenter_reference as R
from jaxdissect.convert.segmenter import convert
from jaxdissect.segmentation import SegmenterError, load_segmenter, segment
from helpers import reference_quad

UPP_SIZE = 64  # the original uses 256; a smaller voting size keeps the test fast
COLOR_SIZES = [32, 64]  # two sizes: exercises the softmax voting


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    upp = R.make_upp_checkpoint(tmp / "upp_pth", seed=3)
    color_json = dict(R.color_labels(), segsizes=COLOR_SIZES)
    color = R.make_color_checkpoint(tmp / "color_pth", labels=color_json, seed=4)
    convert(upp["encoder"], upp["decoder"], upp["labels"], str(tmp / "upp"))
    convert(color["encoder"], color["decoder"], color["labels"], str(tmp / "color"))
    return {"upp": upp, "color": color, "upp_dir": str(tmp / "upp"), "color_dir": str(tmp / "color")}


def _softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def reference_segment(models, images_nhwc, downsample, quirk=True, faithful_blank=False):
    """The original's MergedSegmenter([UPP(all_parts, quad), colour]).segment_batch, in NumPy/PyTorch."""
    with open(models["upp"]["labels"]) as f:
        ul = json.load(f)
    with open(models["color"]["labels"]) as f:
        cl = json.load(f)
    x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
    seg_shape = (x.shape[2] // downsample, x.shape[3] // downsample)
    n_obj = len(ul["object"]) - 1
    # UPP: part numbering while walking owners in key order.
    objnum = {k: v for v, k in enumerate(ul["object"])}
    first = n_obj * 5 + 1 + len(ul["material"]) - 1
    partnum, partnames, trans = {}, [], []
    for owner in ul["object_part"]:
        row = []
        for p in ul["object_part"][owner]:
            if p in objnum:
                row.append(objnum[p])
            else:
                partnum.setdefault(p, first + len(partnames))
                if partnum[p] == first + len(partnames):
                    partnames.append(p)
                row.append(partnum[p])
        trans.append(np.array(row))
    upp_len = 1 + 5 * n_obj + len(ul["material"]) - 1 + len(partnames)
    enc, dec = R.load_upp_reference(models["upp"])
    _, out = R.upp_reference_forward(enc, dec, R.upp_preprocess_reference(x, UPP_SIZE), seg_shape)
    obj = _softmax(out["object"].numpy(), 1).argmax(1)
    mat = _softmax(out["material"].numpy(), 1).argmax(1)
    mat = np.where(mat > 0, mat + 5 * n_obj, 0)
    part_logits = out["part"].numpy()
    owners_by_number = sorted(ul["object_part"], key=lambda k: objnum[k])
    start = {}
    s = 0
    for o in owners_by_number:
        start[o] = s
        s += len(ul["object_part"][o])
    part = np.zeros_like(obj)
    for owner, t in zip(ul["object_part"], trans):
        group = part_logits[:, start[owner]:start[owner] + len(t)]
        local = _softmax(group, 1).argmax(1)
        part = np.where(obj == objnum[owner], t[local], part)
    quads = [reference_quad(o, n_obj, quirk)[:2] for o in obj]
    upp = np.stack([obj, mat, part, np.stack([q[0] for q in quads]), np.stack([q[1] for q in quads])], 1)
    # Colour.
    labelmap, n = {"-": 0}, 1
    for e in cl["labels"]:
        if e.get("internal") or e["name"] in labelmap:
            continue
        labelmap[e["name"]] = n
        n += 1
    cat_idx = {c["name"]: [i for i, e in enumerate(cl["labels"]) if e["category"] == c["name"]]
               for c in cl["categories"]}
    enc, dec = R.load_color_reference(models["color"])
    pred = 0
    for size in cl["segsizes"]:
        xc = R.color_preprocess_reference(x, cl["imageformat"], size)
        _, logits = R.color_reference_forward(enc, dec, xc, seg_shape)
        p = _softmax(logits.numpy(), 1)
        q = np.empty_like(p)
        for idx in cat_idx.values():
            q[:, idx] = _softmax(p[:, idx], 1)
        pred = pred + q
    catseg = {c: pred[:, idx].argmax(1) for c, idx in cat_idx.items()}
    colors = []
    for c in cl["categories"]:
        idx = cat_idx[c["name"]]
        m = np.array([labelmap.get(cl["labels"][i]["name"], 0) for i in idx])[catseg[c["name"]]]
        if c.get("mask"):
            mc, mi = [(k, v.index(j)) for k, v in cat_idx.items() for j in v
                      if cl["labels"][j]["name"] == c["mask"]][-1]
            m = m * (catseg[mc] == mi)
        colors.append(np.where(m > 0, m + upp_len, upp_len if faithful_blank else 0))
    return np.concatenate([upp, np.stack(colors, 1)], 1).astype(np.int32), upp_len


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Smooth random images (low-frequency noise) in [-1, 1].
    coarse = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    return np.clip(coarse.repeat(8, 1).repeat(8, 2) + rng.normal(0, 0.05, (2, 64, 64, 3)), -1, 1
                   ).astype(np.float32)


@pytest.mark.slow
def test_segment_matches_reference(models, images):
    segmenter, variables = load_segmenter(models["upp_dir"], models["color_dir"], "netpqc")
    segmenter = segmenter.clone(upp_segsizes=(UPP_SIZE,))
    labels, names, cats = segment(segmenter, variables, jnp.asarray(images), downsample=4)
    ref, upp_len = reference_segment(models, images, 4)
    labels = np.asarray(labels)
    assert labels.dtype == np.int32 and labels.shape == (2, 7, 16, 16)
    # Non-degenerate maps, or the comparison would prove little.
    assert len(np.unique(labels[:, 0])) > 2 and (labels[:, 2] > 0).any() and (labels[:, 3] > 0).any()
    assert len(np.unique(labels[:, 5])) > 1 and len(np.unique(labels[:, 6])) > 1
    for ch in range(7):
        np.testing.assert_array_equal(labels[:, ch], ref[:, ch], err_msg=f"channel {ch}")
    assert names[upp_len] == "-" and cats[upp_len] == "-"
    assert names[upp_len + 1:upp_len + 4] == ["black", "white", "red"]
    assert segmenter.categories == ["object", "part", "material", "color", "shade"]
    assert segmenter.setting == "netpqc" and re.search(r"quad_quirk\W+True", repr(segmenter))
    assert len(names) == len(cats) == upp_len + 9


@pytest.mark.slow
def test_errors(models, images):
    with pytest.raises(SegmenterError, match="needs the colour segmenter: pass color_dir"):
        load_segmenter(models["upp_dir"], None, "netpqc")
    with pytest.raises(SegmenterError, match="upp_dir"):
        load_segmenter(None, models["color_dir"], "netpqc")
    with pytest.raises(SegmenterError, match="does not exist"):
        load_segmenter("/nonexistent/upp", models["color_dir"])
    with pytest.raises(SegmenterError, match="pass it as color_dir"):
        load_segmenter(models["color_dir"], models["color_dir"])
    with pytest.raises(SegmenterError, match="no colour segmenter"):
        load_segmenter(models["upp_dir"], models["color_dir"], "netpq")
    with pytest.raises(SegmenterError, match="sky"):  # default owners absent from these labels
        load_segmenter(models["upp_dir"], None, "netq")
    with pytest.raises(SegmenterError, match="texture"):
        load_segmenter(models["upp_dir"], None, "netpqx")
    with pytest.raises(SegmenterError, match="model.json"):
        load_segmenter(models["upp"]["dir"], models["color_dir"])  # the .pth folder, not converted
    segmenter, variables = load_segmenter(models["upp_dir"], None, "netp")
    for bad, words in [(images[0], "NHWC"), (images.transpose(0, 3, 1, 2), "NHWC"),
                       (images * 127.5 + 127.5, "not \\[-1, 1\\]"), (images[:, :3], "smaller than downsample"),
                       ((images > 0).astype(np.uint8), "floating"),
                       (np.full_like(images, np.nan), "NaN")]:
        with pytest.raises(SegmenterError, match=words):
            segment(segmenter, variables, bad)


@pytest.mark.slow
def test_segmenters_converted_before_the_move_still_load(models, tmp_path):
    """Segmenters converted while they lived in ``jaxdissect.segmenters`` record those class paths in model.json."""
    import shutil

    old = {"upp_dir": "jaxdissect.segmenters.upernet.UnifiedParsing",
           "color_dir": "jaxdissect.segmenters.ppm.ColorSegmenter"}
    dirs = {}
    for key, path in old.items():
        dirs[key] = str(tmp_path / key)
        shutil.copytree(models[key], dirs[key])
        record_path = tmp_path / key / "model.json"
        record = json.loads(record_path.read_text())
        assert record["class"] == path.replace("jaxdissect.segmenters.", "jaxdissect.segmentation.")
        record["class"] = path
        record_path.write_text(json.dumps(record))
    segmenter, variables = load_segmenter(dirs["upp_dir"], dirs["color_dir"], "netpqc")
    now, now_variables = load_segmenter(models["upp_dir"], models["color_dir"], "netpqc")
    assert segmenter == now
    assert jax.tree.structure(variables) == jax.tree.structure(now_variables)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(now_variables)))


@pytest.mark.slow
def test_segmentation_size_is_floor_of_image_size(models):
    """As the original: a 227-pixel AlexNet crop is segmented at 227 // 4 = 56."""
    segmenter, variables = load_segmenter(models["upp_dir"], models["color_dir"], "netpqc")
    out = jax.eval_shape(lambda v, x: segmenter.apply(v, x, 4), variables,
                         jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32))
    assert out.shape[0] == 2 and out.shape[2:] == (56, 56)


class _Scenes:
    """Smooth random 64x64 images: the model reads ``image``, the segmenter ``display``."""

    name = "scenes"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def fingerprint(self):
        return {"kind": "scenes", "n": self.n}

    def get_batch(self, indices):
        rng = np.random.default_rng([7] + [int(i) for i in indices])
        coarse = rng.integers(0, 256, (len(indices), 8, 8, 3)).astype(np.uint8)
        display = coarse.repeat(8, 1).repeat(8, 2)
        return {"image": display.astype(np.float32) / 127.5 - 1, "display": display,
                "valid": np.ones(len(indices), bool)}


@pytest.mark.slow
def test_dissection_traces_the_segmenter_once(models, monkeypatch):
    """Setting up a dissection traces the segmenter at the run's batch shape and placement; the first batch
    reuses that trace (tracing the network again cost about 1 s for the full-size UPP segmenter)."""
    import jaxdissect.segmentation.segmenter as S
    from jaxdissect.models.small_cnn import SmallCNN
    from jaxdissect.pipelines.dissect import dissect
    from helpers import numpy_init

    traced = []
    real = S.upp_preprocess
    monkeypatch.setattr(S, "upp_preprocess", lambda images, size: traced.append(images.shape) or real(images, size))
    segmenter, variables = load_segmenter(models["upp_dir"], None, "netp")
    segmenter = segmenter.clone(upp_segsizes=(UPP_SIZE,))
    module = SmallCNN(widths=(4, 4))
    model_vars = numpy_init(module, (1, 64, 64, 3))
    # A batch size no other test here uses, so no earlier trace is in JAX's caches; three batches.
    result = dissect(module, model_vars, ["conv2"], _Scenes(15), (segmenter, variables), quantile=0.2,
                     topk=2, batch_size=5, output_dir=None, progress=False)["conv2"]
    assert traced == [(5, 64, 64, 3)]
    assert int(result.images) == 15
