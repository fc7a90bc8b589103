"""dissect_activations end to end: planted concepts, exact thresholds, errors, save/load, 1 vs 8 devices."""

import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import jax
import numpy as np
import pytest
import torch

from jaxdissect import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = 1 / 64          # each planted label covers exactly 1/64 of the pixels
S, N, BATCH, U, L = 16, 16, 5, 6, 7
NAMES = ["-", "sky", "tree", "car", "door", "floor", "kitchen"]
CATS = ["-", "object", "object", "object", "part", "material", "scene"]

PLANTED = textwrap.dedent('''
import numpy as np

def planted(seed=0):
    """Units 0..3 fire exactly on labels 1..4 (2x2 blocks, 4 of 256 pixels each per image); 4, 5 are noise.

    Label 5 fills the rest of the left half; odd images repeat channel 0 in channel 1 (a pixel must
    count once per label); image label 6 ("kitchen") on images 0..5, -1 (none) elsewhere.
    """
    S, N, U = 16, 16, 6
    rng = np.random.default_rng(seed)
    seg = np.zeros((N, 2, S, S), np.int32)
    acts = rng.random((N, S, S, U)).astype(np.float32)
    for i in range(N):
        cells = rng.choice(64, 4, replace=False)
        seg[i, 0, :, :S // 2] = 5
        for label, cell in enumerate(cells, start=1):
            y, x = 2 * (cell // 8), 2 * (cell % 8)
            seg[i, 0, y:y + 2, x:x + 2] = label
            acts[i, y:y + 2, x:x + 2, label - 1] += 2.0
        if i % 2:
            seg[i, 1] = seg[i, 0]
    image_labels = np.where(np.arange(N) < 6, 6, -1).astype(np.int32)[:, None]
    return acts, seg, image_labels
''')
exec(PLANTED)


def batches_of(*arrays, size=BATCH):
    def batches():
        for i in range(0, len(arrays[0]), size):
            yield tuple(a[i:i + size] for a in arrays)
    return batches


def dissect_planted(batches, **kwargs):
    return statistics.dissect_activations(batches, L, Q, (S, S), label_names=NAMES, categories=CATS, topk=5,
                                          **kwargs)


@pytest.fixture(scope="module")
def planted_workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dissect"))


@pytest.fixture(scope="module")
def planted_result(planted_workdir):
    acts, seg, image_labels = planted()  # noqa: F821 (defined by exec above)
    result = dissect_planted(batches_of(acts, seg, image_labels), workdir=planted_workdir, num_batches=4)
    return acts, seg, image_labels, result


def test_planted_units_get_their_label_with_iou_one(planted_result):
    acts, seg, image_labels, r = planted_result
    np.testing.assert_array_equal(r.label[:4], [1, 2, 3, 4])
    np.testing.assert_array_equal(r.label_iou[:4], 1.0)
    assert r.interpretable[:4].all() and not r.interpretable[4:].any()
    assert (r.iou[4:, 1:] < 0.04).all()
    assert [d["label"] for d in r.labels[:4]] == ["sky", "tree", "car", "door"]
    assert r.labels[3]["category"] == "part" and r.labels[0]["iou"] == 1.0
    # Exact counts: every unit is active on 1/64 of the pixels; labels counted once per pixel.
    assert r.pixels == N * S * S and r.images == N
    np.testing.assert_array_equal(r.active, N * 4)
    np.testing.assert_array_equal(r.label_pixels[1:5], N * 4)
    assert r.label_pixels[5] == (seg[:, 0] == 5).sum() and r.label_pixels[6] == 6 * S * S
    np.testing.assert_allclose(r.iou[:, 0], Q)                   # row 0 = activation rate


def test_thresholds_topk_and_means_match_numpy(planted_result):
    acts, _, _, r = planted_result
    flat = acts.reshape(-1, U)
    np.testing.assert_array_equal(r.thresholds, np.quantile(flat, 1 - Q, axis=0))
    score = acts.max((1, 2))
    for u in range(U):
        np.testing.assert_array_equal(r.top_index[u], np.lexsort((np.arange(N), -score[:, u]))[:5])
        assert r.act_mean[u] == float(sum(Fraction(float(v)) for v in flat[:, u]) / len(flat))
    np.testing.assert_array_equal(r.act_max, flat.max(0))


def test_row0_quirk_and_miniou_only_change_the_labelling(planted_result):
    r = planted_result[3]
    assert (r.label > 0).all()
    quirk = r.relabel(row0_competes=True)
    np.testing.assert_array_equal(quirk.label[:4], [1, 2, 3, 4])
    best_real = r.iou[:, 1:].max(1)
    np.testing.assert_array_equal(quirk.label[4:] == 0, best_real[4:] < r.iou[4:, 0])
    assert quirk.config["row0_competes"] and not r.config["row0_competes"]
    strict = r.relabel(miniou=1.0)
    assert not strict.interpretable.any() and (strict.label == r.label).all()
    np.testing.assert_array_equal(quirk.thresholds, r.thresholds)


def test_work_directory_resumes_and_refuses_other_settings(planted_result, planted_workdir):
    from jaxdissect import streaming

    acts, seg, image_labels, r = planted_result
    assert sorted(os.listdir(planted_workdir)) == ["pass1", "pass2", "pass3"]

    def no_data():   # finished passes are restored, not recomputed: only the first batch is read
        yield acts[:5], seg[:5], image_labels[:5]
        raise AssertionError("a finished dissection read its data again")
    again = dissect_planted(no_data, workdir=planted_workdir, num_batches=4)
    for field in ("thresholds", "iou", "intersection", "top_index", "act_mean"):
        np.testing.assert_array_equal(getattr(again, field), getattr(r, field), err_msg=field)
    with pytest.raises(streaming.StreamError, match="different arguments"):
        statistics.dissect_activations(no_data, L, 0.5, (S, S), topk=5, workdir=planted_workdir, num_batches=4)


def test_save_and_load_round_trip(planted_result, tmp_path):
    r = planted_result[3]
    r.save(str(tmp_path))
    back = statistics.DissectionResult.load(str(tmp_path))
    for field in ("thresholds", "iou", "label", "label_iou", "interpretable", "intersection", "top_index",
                  "top_values", "act_mean", "act_max", "label_pixels", "active"):
        np.testing.assert_array_equal(getattr(back, field), getattr(r, field), err_msg=field)
        assert getattr(back, field).dtype == getattr(r, field).dtype
    assert back.labels == r.labels and back.pixels == r.pixels and back.config == r.config
    with pytest.raises(FileNotFoundError, match="no dissection result"):
        statistics.DissectionResult.load(str(tmp_path / "missing"))


@pytest.mark.slow
def test_upsampled_thresholds_equal_the_quantile_of_torch_upsampled_maps():
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((6, 7, 7, 3)).astype(np.float32)
    seg = rng.integers(0, 4, (6, 1, 14, 14)).astype(np.int32)
    r = statistics.dissect_activations(batches_of(acts, seg, size=4), 4, 0.05, 14, topk=3)
    x = (np.arange(14) + 0.5) / 2 - 0.5
    g = 2 * x / 6 - 1
    grid = torch.tensor(np.stack(np.meshgrid(g, g), -1)[None].repeat(6, 0), dtype=torch.float32)
    up = torch.nn.functional.grid_sample(torch.tensor(acts).permute(0, 3, 1, 2), grid, mode="bilinear",
                                         padding_mode="zeros", align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(r.thresholds, np.quantile(up.reshape(-1, 3), 0.95, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.active / r.pixels, 0.05, atol=1.5 / r.pixels)
    # Passes 1-3 see bit-identical upsampled maps: exact level and active counts agree with each other.
    plan = statistics.Plan(num_units=3, num_labels=4, source_hw=(7, 7), resolution=(14, 14))
    ours = np.concatenate([np.asarray(jax.jit(plan.upsample)(acts[i:i + 4])) for i in (0, 4)])[:6]
    np.testing.assert_array_equal(r.thresholds, np.quantile(ours.reshape(-1, 3), 0.95, axis=0))
    np.testing.assert_array_equal(r.active, (ours > r.thresholds).sum((0, 1, 2)))


def test_bad_inputs_name_the_unit_batch_and_fix(monkeypatch):
    acts, seg, image_labels = planted()  # noqa: F821
    nan = acts.copy()
    nan[7, 3, 3, 2] = np.nan
    with pytest.raises(statistics.DissectionError, match=r"batch 1: unit 2 has NaN/Inf"):
        dissect_planted(batches_of(nan, seg))
    bad = seg.copy()
    bad[0, 1, 0, 0] = L
    with pytest.raises(statistics.DissectionError, match=r"batch 0: segmentation values \[7\] lie outside"):
        statistics.dissect_activations(batches_of(acts, bad), L, Q, (S, S))
    with pytest.raises(statistics.DissectionError, match=r"image label values \[-3\]"):
        statistics.dissect_activations(batches_of(acts, seg, np.full((N, 1), -3, np.int32)), L, Q, (S, S))
    with pytest.raises(statistics.DissectionError, match=r"\[B, K, 8, 8\]"):
        statistics.dissect_activations(batches_of(acts, seg), L, Q, (8, 8))

    def changing():
        yield acts[:5], seg[:5]
        yield acts[5:10, :, :, :4], seg[5:10]
    with pytest.raises(statistics.DissectionError, match="batch 1 has activations"):
        dissect_planted(changing)
    with pytest.raises(statistics.DissectionError, match="label_names has 2 entries"):
        statistics.dissect_activations(batches_of(acts, seg), L, Q, (S, S), label_names=["a", "b"])
    monkeypatch.setattr(statistics, "_MAX_PIXELS", 7 * S * S)
    with pytest.raises(statistics.DissectionError, match="batch 1: more than 1792 pixels per device"):
        dissect_planted(batches_of(acts, seg))
    monkeypatch.undo()
    with pytest.raises(statistics.DissectionError, match="num_batches"):
        statistics.dissect_activations(batches_of(acts, seg), L, Q, (S, S), workdir="/nonexistent")


def test_kernel_flags_catch_what_bypasses_the_host_checks():
    plan = statistics.Plan(num_units=2, num_labels=3, source_hw=(2, 2), resolution=(2, 2), topk=2)
    acts = np.zeros((2, 2, 2, 2), np.float32)
    acts[1, 0, 0, 1] = np.inf
    valid = np.ones(2, bool)
    state = statistics.pass1_update(plan, plan.pass1_init(), acts, valid, np.arange(2), np.array([4, 4]))
    with pytest.raises(statistics.DissectionError, match="unit 1 has 1 NaN/Inf upsampled activations, the first "
                                                         "in batch 4"):
        plan.pass1_finish({k: {kk: np.asarray(vv)[None] for kk, vv in v.items()} for k, v in state.items()})


@pytest.mark.slow
def test_one_and_eight_devices_give_bit_identical_results(planted_result, tmp_path):
    code = PLANTED + textwrap.dedent(f'''
        from jaxdissect import statistics
        acts, seg, image_labels = planted()
        def batches():
            for i in range(0, 16, 5):
                yield acts[i:i + 5], seg[i:i + 5], image_labels[i:i + 5]
        statistics.dissect_activations(batches, 7, 1 / 64, 16, topk=5).save({str(tmp_path)!r})
    ''')
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = statistics.DissectionResult.load(str(tmp_path))
    one = planted_result[3]
    assert eight.config["devices"] == 8 and one.config["devices"] == 1
    for field in ("thresholds", "iou", "label", "intersection", "active", "label_pixels", "top_index",
                  "top_values", "act_mean", "act_max"):
        np.testing.assert_array_equal(getattr(eight, field), getattr(one, field), err_msg=field)
