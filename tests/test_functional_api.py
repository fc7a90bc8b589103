"""The functional API as a new user meets it: one-shot iterators, inferred resolution, label indices, progress."""

import numpy as np
import pytest

from jaxdissect.statistics import DissectionError, dissect_activations

N, B, S, U, LABELS = 12, 4, 8, 3, 4


def _data(seed=0):
    rng = np.random.RandomState(seed)
    seg = np.kron(rng.randint(0, LABELS, (N, 2, 2)), np.ones((S // 2, S // 2), np.int64)).astype(np.int32)
    acts = rng.gamma(1.0, 1.0, (N, 4, 4, U)).astype(np.float32)
    acts[..., 0] += 5.0 * (seg[:, ::2, ::2] == 2)   # unit 0 fires on label 2 (planted)
    return acts, seg


def test_one_generator_object_is_an_error_not_zero_iou():
    acts, seg = _data()
    gen = ((acts[i:i + B], seg[i:i + B][:, None]) for i in range(0, N, B))
    with pytest.raises(DissectionError, match="FRESH iterator"):
        dissect_activations(lambda: gen, LABELS, quantile=0.2, topk=3, progress=False)


def test_shape_probe_does_not_consume_a_batch_of_a_fresh_iterator():
    acts, seg = _data()
    calls = []

    def batches():
        calls.append(1)
        for i in range(0, N, B):
            yield acts[i:i + B], seg[i:i + B][:, None]

    result = dissect_activations(batches, LABELS, quantile=0.2, topk=3, progress=False)
    assert result.images == N
    assert len(calls) == 3   # one iterator per pass; the probe's batch goes to pass 1


def test_resolution_inferred_and_bss_segmentation_accepted_and_label_index_shown(capsys):
    acts, seg = _data()
    # A [B, S, S] segmentation (K = 1) at 8x8, no resolution= given.
    result = dissect_activations(lambda: ((acts[i:i + B], seg[i:i + B]) for i in range(0, N, B)), LABELS,
                                 quantile=0.2, topk=3, progress=False)
    assert result.config["resolution"] == [S, S]
    assert result.label[0] == 2                      # the planted detector
    assert result.labels[0]["label"] == "2"          # the label index, since no names were given
    assert capsys.readouterr().err == ""             # progress=False: silent
    dissect_activations(lambda: ((acts[i:i + B], seg[i:i + B]) for i in range(0, N, B)), LABELS,
                        quantile=0.2, topk=3)
    assert "dissect pass3" in capsys.readouterr().err   # the progress bars, by default
