"""launch.ablate_classifier reads images with the model's own preprocessing and maps classes by name."""

import numpy as np
import pytest

from launch import ablate_classifier as launcher
from launch.common import LaunchError


@pytest.mark.slow
def test_demo_model_ablation_accuracy_equals_its_training_evaluation(tmp_path):
    from PIL import Image

    from jaxdissect.data.synthetic import SyntheticScenes
    from jaxdissect.pipelines import train_synthetic

    from jaxdissect.interventions.classifier import perclass_counts, perclass_metrics

    settings = dict(num_train=512, num_test=48, steps=200, batch_size=32, widths=(16, 16, 32, 32), image_size=32,
                    learning_rate=5e-3)
    module, variables, info = train_synthetic.train_or_load(str(tmp_path / "cache"), log=None, progress=False,
                                                            **settings)
    # The test scenes the training evaluated, as image files in class folders (names, not the model's order).
    test = SyntheticScenes(48, seed=train_synthetic.TEST_SEED, size=32)
    batch = test.get_batch(range(48))
    for i, (display, label) in enumerate(zip(batch["display"], batch["label"])):
        folder = tmp_path / "val" / test.class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(display).save(folder / f"{i:03d}.png")
    data = f"places:{tmp_path / 'val'}"
    summary = launcher.run(info["path"], data, data, str(tmp_path / "out"), layer="conv4", sizes=[1],
                           batch_size=16)
    assert summary["val_images"] == 48
    assert summary["val_accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-12)
    # Per class too, against the model applied directly to the scenes (class order = the model's).
    predictions = np.asarray(module.apply(variables, batch["image"])).argmax(-1)
    want = perclass_metrics(perclass_counts(batch["label"], predictions, 6))["balanced_accuracy"]
    for c, name in enumerate(test.class_names):
        got = summary["classes"][name]["val_baseline_ba"]
        assert (got is None and np.isnan(want[c])) or got == pytest.approx(want[c], abs=1e-12), name
    assert info["test_accuracy"] > 0.25   # above chance (1/6), so a wrong mapping would show


def test_folders_the_model_does_not_name_are_an_error(tmp_path):
    """The folders are matched by the names of model.json (jaxdissect.data.classes, tested in test_classes)."""
    from PIL import Image

    from jaxdissect.data.classes import ClassMappingError
    from jaxdissect.pipelines import train_synthetic

    settings = dict(num_train=32, num_test=8, steps=2, batch_size=8, widths=(4, 4, 4, 4), image_size=32)
    _, _, info = train_synthetic.train_or_load(str(tmp_path / "cache"), log=None, progress=False, **settings)
    for name in ("kitchn", "bedroom"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "val" / name / "0.png")
    with pytest.raises(ClassMappingError, match="'kitchn' is not a class of --model=.*did you mean kitchen"):
        launcher.run(info["path"], f"places:{tmp_path / 'val'}", f"places:{tmp_path / 'val'}", str(tmp_path / "o"),
                     layer="conv4", sizes=[1])


def test_model_without_preprocessing_is_an_error(tmp_path):
    import jax

    from jaxdissect.checkpoint import save_model
    from jaxdissect.pipelines import train_synthetic

    module, shapes = train_synthetic.abstract_model(widths=(4, 4, 4, 4), image_size=32)
    variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    save_model(str(tmp_path / "m"), module, variables, metadata={"model": "x"})
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(LaunchError, match="records no input preprocessing"):
        launcher.run(str(tmp_path / "m"), str(tmp_path / "val"), str(tmp_path / "val"), str(tmp_path / "o"))
