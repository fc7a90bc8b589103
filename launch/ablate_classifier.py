r"""Classifier unit ablation (spec 3.3): which units of a layer each class needs.

For VGG16-Places365 at conv5_3, as in the paper::

  python -m launch.ablate_classifier --model=models/vgg16_places365 --layer=conv5_3 \
      --data=places:datasets/places/val --train_data=places:datasets/places/train \
      --class_order=sorted_folders \
      --iou=results/vgg16-places-netpqc-conv5_3-10/conv5_3/report.json \
      --output_dir=results/vgg16-places-conv5_3-ablation

Per class: units ranked by train balanced accuracy after single-unit ablation,
then on val the top n units ablated, and only the top n kept. Outputs in
``--output_dir``: ``summary.json``, ``results.npz``, ``ice-all-classes.png``,
``ice-one-class.png``, ``ice-vs-iou.png`` and the cached count files
(``pra_*.npz``). Interrupted, the same command resumes; finished pieces are
never recomputed.

The images are read with the model's own preprocessing (``preprocessing`` in
its ``model.json``), and the class folders are matched to the model's outputs
by name through ``classes`` in ``model.json``; without that list,
``--class_order=sorted_folders`` states that output ``i`` is the ``i``-th
class folder in sorted order (true of Places365 and the converted VGG16).
"""

from __future__ import annotations

import difflib
import os

import numpy as np
from absl import flags

from launch import common
from launch.common import LaunchError

FLAGS = flags.FLAGS


def image_source(spec: str, preprocessing: dict, on_bad_image: str, flag: str = "data"):
    """A labelled image source from ``places:<dir>`` (or a bare ``<dir>``) or ``tfds:places365_small[:split]``."""
    scheme = spec.partition(":")[0]
    if scheme not in common.DATA_SCHEMES:
        spec = f"places:{spec}"
        scheme = "places"
    if scheme not in ("places", "tfds"):
        raise LaunchError(f"--{flag}={spec}: give labelled images, places:<dir> (class folders "
                          "<dir>/<class>/<image>) or tfds:places365_small[:split]")
    source, _ = common.make_data(spec, preprocessing=preprocessing, on_bad_image=on_bad_image, flag=flag)
    return source


class Relabelled:
    """A labelled source whose labels are mapped to the model's class indices (``mapping[folder index]``)."""

    def __init__(self, source, mapping: np.ndarray, classes: list[str]):
        self.source, self.mapping, self.classes = source, np.asarray(mapping, np.int32), list(classes)
        self.name = getattr(source, "name", "data")

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def get_batch(self, indices) -> dict:
        batch = dict(self.source.get_batch(indices))
        batch["label"] = self.mapping[np.asarray(batch["label"], np.int64)]
        return batch

    def fingerprint(self) -> dict:
        return {**self.source.fingerprint(), "label_mapping": self.mapping.tolist()}


def class_mapping(folders: list[str], model_classes: list[str] | None, num_outputs: int, class_order: str,
                  flag: str = "data") -> tuple[np.ndarray, list[str]]:
    """``(model index per folder class, the model's class names)``; an error when it cannot be established."""
    if model_classes:
        index = {c: i for i, c in enumerate(model_classes)}
        unknown = [c for c in folders if c not in index]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(index), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LaunchError(f"--{flag}: class folder(s) {', '.join(map(repr, unknown[:5]))} are not classes of "
                              f"the model{hint}; its model.json lists {len(model_classes)} classes, e.g. "
                              f"{', '.join(model_classes[:5])}")
        return np.array([index[c] for c in folders], np.int32), list(model_classes)
    if class_order != "sorted_folders":
        raise LaunchError(f"--{flag}: the model's model.json lists no 'classes', so its outputs cannot be matched "
                          "to the class folders; add \"classes\": [...] to model.json, or pass "
                          "--class_order=sorted_folders if output i is the i-th class folder in sorted order")
    if len(folders) != num_outputs:
        raise LaunchError(f"--class_order=sorted_folders: {len(folders)} class folders but the model has "
                          f"{num_outputs} outputs; give every class folder, or add 'classes' to model.json")
    return np.arange(len(folders), dtype=np.int32), list(folders)


def run(model: str, data: str, train_data: str, output_dir: str, *, layer: str = "conv5_3",
        sizes=(1, 2, 3, 4, 5, 20, 64, 128, 256), plot_class: str | None = None, full_classes=(),
        iou: str | None = None,
        batch_size: int = 32, num_images: int | None = None, train_images: int | None = None,
        method: str = "auto", on_bad_image: str = "raise", class_order: str = "metadata",
        overwrite: bool = False) -> dict:
    """Load the model and data, run the experiment, print the headline numbers, return the summary."""
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.pipelines.ablate_classifier import classifier_ablation_experiment

    try:
        sizes = [int(s) for s in sizes]
    except ValueError:
        raise LaunchError(f"--sizes={','.join(map(str, sizes))}: give integers, e.g. --sizes=1,2,3,4,5,20") from None
    if not os.path.isdir(model):
        raise LaunchError(f"--model={model}: no such directory; convert the classifier first "
                          "(python -m converters.vgg16_places365 ...)")
    # The cached pieces are named, not keyed by the data: a directory of other settings is refused.
    common.check_output_dir(output_dir, {"model": os.path.abspath(model), "layer": layer, "data": data,
                                         "train_data": train_data, "num_images": num_images,
                                         "train_images": train_images, "on_bad_image": on_bad_image,
                                         "class_order": class_order}, overwrite=overwrite,
                            remove=("pra_*.npz", "summary.json", "results.npz"))
    module, variables = load_model(model)
    meta = load_metadata(model) or {}
    preprocessing = common.model_preprocessing(meta, path=model)
    val = image_source(data, preprocessing, on_bad_image)
    train = image_source(train_data, preprocessing, on_bad_image, flag="train_data")
    folders = getattr(val, "classes", None)
    if folders is not None and getattr(train, "classes", folders) != folders:
        raise LaunchError("--data and --train_data have different class folders; both must list the same classes")
    classes = None
    if folders is not None:
        import jax

        x = np.asarray(val.get_batch([0])["image"][:1])
        num_outputs = int(jax.eval_shape(module.apply, variables, x).shape[-1])
        mapping, classes = class_mapping(list(folders), meta.get("classes"), num_outputs, class_order)
        val, train = Relabelled(val, mapping, classes), Relabelled(train, mapping, classes)
    bars: dict = {}

    def progress(what, b, n):
        from jaxdissect.progress import progress as bar

        if what not in bars:
            bars[what] = bar(total=n, desc=what, unit="batch")
        bars[what].update(b - bars[what].n)
        if b == n:
            bars.pop(what).close()

    summary = classifier_ablation_experiment(
        module, variables, layer, val, train, output_dir, class_names=classes, sizes=sizes,
        plot_class=plot_class, full_classes=full_classes, iou_path=iou, batch_size=batch_size,
        val_items=num_images, train_items=train_images, method=method, progress=progress)
    mba = summary["mean_balanced_accuracy"]
    print(f"val accuracy with all units: {summary['val_accuracy']:.4f}")
    print(f"mean balanced single-class accuracy on val: {mba['val_baseline']:.3f} with all units")
    for n in sizes:
        print(f"  n = {n}: top n removed {mba['ablate_top'][str(n)]:.3f}, only top n kept "
              f"{mba['keep_only_top'][str(n)]:.3f}")
    print(f"wrote {output_dir}/summary.json, results.npz and plots")
    return summary


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted classifier directory (python -m converters.vgg16_places365 ...).")
    flags.DEFINE_string("layer", "conv5_3", "Layer whose units are ablated.")
    common.define_data_flag("Evaluation images: places:<dir> with class folders <dir>/<class>/<image> "
                            "(a bare <dir> too) or tfds:places365_small[:split].")
    flags.DEFINE_string("train_data", None, "Images the units are ranked on (same forms as --data).")
    common.define_output_flags("Results and cache directory (created; reused to resume).")
    flags.DEFINE_list("sizes", ["1", "2", "3", "4", "5", "20", "64", "128", "256"], "Numbers n of top units per class.")
    flags.DEFINE_string("plot_class", None, "Class shown in ice-one-class.png (default: the most damaged by one unit).")
    flags.DEFINE_list("full_classes", [], "Classes for which every n = 1 .. units-1 is evaluated (the paper: "
                      "computer_room,hangar-indoor,ski_resort,volleyball_court-outdoor).")
    flags.DEFINE_string("iou", None, "Dissection report.json (or npz with 'iou') of the layer, for ice-vs-iou.")
    flags.DEFINE_integer("batch_size", 32, "Images per step.")
    flags.DEFINE_integer("num_images", None, "Use only the first N evaluation images.")
    flags.DEFINE_integer("train_images", None, "Use only the first N training images (the notebook used len(val)).")
    flags.DEFINE_enum("method", "auto", ["auto", "fast", "generic"],
                      "Single-unit sweep path (auto: fast when possible).")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"], "Unreadable image: stop, or leave it out of counts.")
    flags.DEFINE_enum("class_order", "metadata", ["metadata", "sorted_folders"],
                      "How class folders map to model outputs: by the names in model.json's 'classes', or "
                      "output i = i-th class folder in sorted order.")


def main(argv):
    del argv
    missing = [n for n in ("model", "data", "train_data", "output_dir") if not getattr(FLAGS, n)]
    if missing:
        raise LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    common.positive("batch_size", FLAGS.batch_size, allow_none=False)
    common.positive("num_images", FLAGS.num_images)
    common.positive("train_images", FLAGS.train_images)
    common.set_resume_hint(f"run the same command to resume ({FLAGS.output_dir})")
    run(FLAGS.model, FLAGS.data, FLAGS.train_data, FLAGS.output_dir, layer=FLAGS.layer, sizes=FLAGS.sizes,
        plot_class=FLAGS.plot_class, full_classes=FLAGS.full_classes, iou=FLAGS.iou,
        batch_size=FLAGS.batch_size, num_images=FLAGS.num_images, train_images=FLAGS.train_images,
        method=FLAGS.method, on_bad_image=FLAGS.on_bad_image, class_order=FLAGS.class_order,
        overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    define_flags()
    common.run(main)
