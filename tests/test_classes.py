"""Issue 23 item 1: a data set's labels meet a model's outputs only through jaxdissect.data.classes."""

import os

import numpy as np
import pytest

from jaxdissect.data import classes as C
from launcher_cli import cli


def _folder(root, counts):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def test_unit_plot_groups_folder_images_by_their_own_class(user):
    """The issue's case: kitchen/ holds 3 images, bedroom/ 1; the demo model lists kitchen first, bedroom second."""
    data = _folder(user / "val", {"kitchen": 3, "bedroom": 1})
    code, out, err = cli("unit_plot", f"--data=places:{data}", "--classes=kitchen", "--output_dir=plot")
    assert code == 0, err[-2000:]
    assert "kitchen: 3 images, other classes: 1 images" in out, out
    labels = np.load(user / "plot" / "unit_plot.npz")["label"]
    assert sorted(labels.tolist()) == [0, 0, 0, 1]   # the model's indices: kitchen 0, bedroom 1


def test_a_folder_the_model_does_not_know_is_an_error(user):
    data = _folder(user / "val", {"kitchn": 1, "bedroom": 1})
    for launcher, args in (("unit_plot", ["--classes=bedroom"]), ("adversarial", ["--targets=bedroom"]),
                           ("ablate_classifier", [])):
        code, out, err = cli(launcher, f"--data=places:{data}", *args, f"--output_dir={launcher}")
        assert code == 1 and err.count("\n") == 1, err
        assert "'kitchn' is not a class of --model=" in err and "did you mean kitchen" in err, err


def test_class_map_by_name():
    m = C.class_map(["a", "b", "c"], ["c", "a", "b"], 3)
    assert m.index.tolist() == [1, 2, 0] and m.names == ("c", "a", "b")
    assert C.class_map(["b"], ["c", "a", "b"], 3).index.tolist() == [2]        # a subset of the classes
    with pytest.raises(C.ClassMappingError, match=r"'kitchn' is not a class of the model \(did you mean kitchen"):
        C.class_map(["kitchn"], ["kitchen", "street"], 2)
    with pytest.raises(C.ClassMappingError, match="lists 2 classes in model.json but has 3 outputs"):
        C.class_map(["a"], ["a", "b"], 3)
    with pytest.raises(C.ClassMappingError, match="names no classes.*--class_order=sorted_folders"):
        C.class_map(None, ["a", "b"], 2)


def test_class_map_without_model_names_needs_a_stated_order():
    with pytest.raises(C.ClassMappingError, match="lists no 'classes'.*--class_order=sorted_folders"):
        C.class_map(["a", "b"], None, 2)
    assert C.class_map(["a", "b"], None, 2, class_order="sorted_folders").index.tolist() == [0, 1]
    with pytest.raises(C.ClassMappingError, match="2 classes but the model has 3 outputs"):
        C.class_map(["a", "b"], None, 3, class_order="sorted_folders")
    with pytest.raises(C.ClassMappingError, match="names output 0 'b' where --data has 'a'"):
        C.class_map(["a", "b"], ["b", "a"], 2, class_order="sorted_folders")
    with pytest.raises(C.ClassMappingError, match="not number its classes in sorted order"):
        C.class_map(["b", "a"], None, 2, class_order="sorted_folders")


def test_model_labelled_source_gives_model_indices(tmp_path):
    from jaxdissect.data.places import PlacesFolder

    source = PlacesFolder(_folder(tmp_path, {"kitchen": 2, "bedroom": 1, "beach": 1}), crop=32)
    model_names = ["kitchen", "bedroom", "street", "forest", "beach", "office"]
    labelled = C.model_labelled(source, model_names, 6)
    batch, raw = labelled.get_batch(range(4)), source.get_batch(range(4))
    want = [model_names.index(source.classes[k]) for k in raw["label"]]
    assert batch["label"].tolist() == want and labelled.classes == model_names
    assert labelled.fingerprint()["label_mapping"] == [4, 1, 0]   # beach, bedroom, kitchen (sorted folders)
