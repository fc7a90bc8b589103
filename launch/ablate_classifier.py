r"""Classifier unit ablation (spec 3.3): which units of a layer each class needs.

For VGG16-Places365 at conv5_3, as in the paper::

  python -m launch.ablate_classifier --model=models/vgg16_places365 --layer=conv5_3 \
      --data=datasets/places/val --train_data=datasets/places/train \
      --iou=results/vgg16-places-netpqc-conv5_3-10/conv5_3/report.json \
      --output_dir=results/vgg16-places-conv5_3-ablation

Per class: units ranked by train balanced accuracy after single-unit ablation,
then on val the top n units ablated, and only the top n kept. Outputs in
``--output_dir``: ``summary.json``, ``results.npz``, ``ice-all-classes.png``,
``ice-one-class.png``, ``ice-vs-iou.png`` and the cached count files
(``pra_*.npz``). Interrupted, the same command resumes; finished pieces are
never recomputed.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


class LaunchError(ValueError):
    """A flag value cannot be used; the message says which and how to fix it."""


def image_source(spec: str, crop: int, on_bad_image: str):
    """A labelled image source from ``<dir>``, ``places:<dir>`` or ``tfds:places365_small[:split]``."""
    from jaxdissect.data import places

    scheme, sep, arg = spec.partition(":")
    if scheme == "tfds" and sep:
        name, _, split = arg.partition(":")
        if name != "places365_small":
            raise LaunchError(f"{spec}: only tfds:places365_small is supported")
        return places.Places365TFDS(split or "validation", crop=crop)
    root = arg if scheme == "places" and sep else spec
    if not os.path.isdir(root):
        raise LaunchError(f"{spec}: no such folder; give a Places-style folder <dir>/<class>/<image>")
    return places.PlacesFolder(root, crop=crop, on_error=on_bad_image)


def run(model: str, data: str, train_data: str, output_dir: str, *, layer: str = "conv5_3",
        sizes=(1, 2, 3, 4, 5, 20, 64, 128, 256), plot_class: str | None = None, full_classes=(),
        iou: str | None = None,
        batch_size: int = 32, num_images: int | None = None, train_images: int | None = None,
        method: str = "auto", on_bad_image: str = "raise") -> dict:
    """Load the model and data, run the experiment, print the headline numbers, return the summary."""
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.interventions import classifier as ci

    try:
        sizes = [int(s) for s in sizes]
    except ValueError:
        raise LaunchError(f"--sizes={','.join(map(str, sizes))}: give integers, e.g. --sizes=1,2,3,4,5,20") from None
    module, variables = load_model(model)
    meta = load_metadata(model)
    crop = int(meta.get("preprocessing", {}).get("crop", 224))
    val = image_source(data, crop, on_bad_image)
    train = image_source(train_data, crop, on_bad_image)
    classes = getattr(val, "classes", None)
    if classes is not None and getattr(train, "classes", classes) != classes:
        raise LaunchError("--data and --train_data have different class folders; both must list the same classes")

    def progress(what, b, n):
        if b == n or b % 10 == 0:
            logging.info("%s: batch %d of %d", what, b, n)

    summary = ci.classifier_ablation_experiment(
        module, variables, layer, val, train, output_dir, class_names=classes, sizes=sizes,
        plot_class=plot_class, full_classes=full_classes, iou_path=iou, batch_size=batch_size,
        val_items=num_images, train_items=train_images, method=method, progress=progress)
    mba = summary["mean_balanced_accuracy"]
    print(f"mean balanced single-class accuracy on val: {mba['val_baseline']:.3f} with all units")
    for n in sizes:
        print(f"  n = {n}: top n removed {mba['ablate_top'][str(n)]:.3f}, only top n kept "
              f"{mba['keep_only_top'][str(n)]:.3f}")
    print(f"wrote {output_dir}/summary.json, results.npz and plots")
    return summary


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    flags.DEFINE_string("model", None, "Converted classifier directory (python -m converters.vgg16_places365 ...).")
    flags.DEFINE_string("layer", "conv5_3", "Layer whose units are ablated.")
    flags.DEFINE_string("data", None, "Evaluation images: a Places-style folder <dir>/<class>/<image> "
                        "(also places:<dir>) or tfds:places365_small[:split].")
    flags.DEFINE_string("train_data", None, "Images the units are ranked on (same forms as --data).")
    flags.DEFINE_string("output_dir", None, "Results and cache directory (created; reused to resume).")
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
    flags.mark_flags_as_required(["model", "data", "train_data", "output_dir"])


def main(argv):
    del argv
    from jaxdissect.checkpoint import CheckpointError
    from jaxdissect.data.folders import DataSourceError
    from jaxdissect.interventions.classifier import InterventionError

    try:
        run(FLAGS.model, FLAGS.data, FLAGS.train_data, FLAGS.output_dir, layer=FLAGS.layer, sizes=FLAGS.sizes,
            plot_class=FLAGS.plot_class, full_classes=FLAGS.full_classes, iou=FLAGS.iou,
            batch_size=FLAGS.batch_size, num_images=FLAGS.num_images, train_images=FLAGS.train_images,
            method=FLAGS.method, on_bad_image=FLAGS.on_bad_image)
    except (LaunchError, CheckpointError, DataSourceError, InterventionError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
