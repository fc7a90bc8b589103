r"""What one unit responds to: a KDE and jittered points of its per-image peak activation.

With no flags, a first look on the embedded demo (the small CNN trained once
on synthetic scenes, cached in ``--cache_dir``; nothing is downloaded): the
``conv4`` unit that best tells the scenes with a disc (kitchen, office) from
the others, on 512 synthetic scenes::

  python -m launch.unit_plot

A classifier unit, its pre-ReLU peak per image split by chosen classes, with
the balanced accuracy of the best single threshold (without ``--unit``: the
layer's unit that separates the classes best)::

  python -m launch.unit_plot --model=vgg16_places365 --layer=conv5_3 --unit=11 \
      --data=places:val --classes=ski_resort,ski_slope --output_dir=results/unit-conv5_3-11

The data's class labels are matched to the model's classes by name (``classes``
in its model.json); a model without names needs ``--class_order=sorted_folders``
(output i is the i-th class folder in sorted order). A data class that is not
one of the model's is an error.

A generator unit, its peak for images with more than ``--fraction`` of a
concept's pixels vs the rest::

  python -m launch.unit_plot --model=proggan_church --layer=layer4 --unit=65 --data=z:1000 \
      --segmenter=netpqc --concept=tree --output_dir=results/unit-layer4-65

Writes ``unit_plot.png``, ``unit_plot.json`` and ``unit_plot.npz``; the pass
over the data resumes when interrupted.
"""

from __future__ import annotations

import os

from absl import flags

from launch import common

FLAGS = flags.FLAGS
DEMO = dict(layer="conv4", data="synthetic:512", classes=("kitchen", "office"))


def run(model: str, layer: str, unit: int | None, data: str, output_dir: str, *, classes=(),
        segmenter: str | None = None, concept: str | None = None, fraction: float = 0.05, pre_relu: bool = True,
        batch_size: int = 32, num_images: int | None = None, on_bad_image: str = "raise",
        class_order: str = "metadata") -> dict:
    """Plot one unit of a classifier (``classes``) or a generator (``segmenter`` and ``concept``)."""
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.data import classes as class_lib
    from jaxdissect.pipelines import unit_plot as up
    from launch.common import LaunchError, data_preprocessing, make_data, model_kind

    module, variables = load_model(model)
    meta = load_metadata(model) or {}
    kind = model_kind(meta, module)
    preprocessing = data_preprocessing(meta, model, data) if kind == "classifier" else None
    source, _ = make_data(data, kind=kind, on_bad_image=on_bad_image, preprocessing=preprocessing)
    if kind == "classifier":
        if not classes:
            raise LaunchError("--classes is required for a classifier unit, e.g. --classes=ski_resort")
        source = class_lib.model_labelled(source, meta.get("classes"),
                                          class_lib.num_outputs(module, variables, source),
                                          class_order=class_order, data=f"--data={data}", model=f"--model={model}")
        summary = up.classifier_unit_plot(module, variables, layer, unit, source, output_dir,
                                          class_names=source.classes, classes=classes, pre_relu=pre_relu,
                                          batch_size=batch_size, num_images=num_images)
    else:
        if unit is None:
            raise LaunchError("--unit is required for a generator unit")
        if not segmenter or not concept:
            raise LaunchError("a generator unit needs --segmenter and --concept (e.g. --concept=tree)")
        from launch.dissect import make_segmentation

        from jaxdissect.segmentation import segment

        (seg, svars), _ = make_segmentation(segmenter)
        z = source.get_batch(list(range(min(len(source), num_images or len(source)))))["z"]
        summary = up.generator_unit_plot(module, variables, layer, unit, z,
                                         lambda images: segment(seg, svars, images)[0], concept, seg.label_names,
                                         output_dir, fraction=fraction, batch_size=batch_size)
    print(f"{layer} unit {summary['unit']}: best single threshold {summary['threshold']:.4g}, balanced accuracy "
          f"{summary['balanced_accuracy']:.3f}; " + ", ".join(f"{k}: {v['count']} images"
                                                             for k, v in summary["groups"].items()))
    print(f"wrote {output_dir}/unit_plot.png, unit_plot.json, unit_plot.npz")
    return summary


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted model directory (classifier or generator); absent: the demo CNN.")
    flags.DEFINE_string("layer", None, f"Layer of the unit (demo: {DEMO['layer']}).")
    flags.DEFINE_integer("unit", None, "Unit index; absent for a classifier: the unit that best separates "
                         "--classes from the other images.")
    common.define_data_flag(f"Data: {common.DATA_HELP} (demo: {DEMO['data']}).")
    common.define_output_flags("Results directory (default results/unit_plot-<model>-<layer>-<unit>).")
    common.define_cache_dir_flag()
    flags.DEFINE_list("classes", [], "Classifier: classes whose images form their own groups (demo: "
                      f"{','.join(DEMO['classes'])}).")
    flags.DEFINE_enum("class_order", "metadata", ["metadata", "sorted_folders"],
                      "How the data's classes map to the model's outputs: by the names in model.json's "
                      "'classes', or output i = i-th class folder in sorted order.")
    flags.DEFINE_bool("pre_relu", True, "Classifier: the activation before the layer's ReLU (<layer>:pre).")
    flags.DEFINE_string("segmenter", None, "Generator: upp=<dir>[,color=<dir>][,setting=netpqc].")
    flags.DEFINE_string("concept", None, "Generator: the concept (segmenter label name).")
    flags.DEFINE_float("fraction", 0.05, "Generator: an image has the concept above this share of its pixels.")
    flags.DEFINE_integer("batch_size", 32, "Images per step.")
    flags.DEFINE_integer("num_images", None, "Use only the first N images / latents.")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"], "Unreadable image: stop, or leave it out.")


def main(argv):
    del argv
    demo = FLAGS.model is None
    layer = FLAGS.layer or (DEMO["layer"] if demo else None)
    data = FLAGS.data or (DEMO["data"] if demo else None)
    classes = FLAGS.classes or (list(DEMO["classes"]) if demo and not FLAGS.concept else [])
    missing = [n for n, v in (("layer", layer), ("data", data)) if v is None]
    if missing:
        raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    if FLAGS.unit is not None and FLAGS.unit < 0:
        raise common.LaunchError(f"--unit={FLAGS.unit}: give a unit index >= 0")
    common.positive("batch_size", FLAGS.batch_size, allow_none=False)
    common.positive("num_images", FLAGS.num_images)
    common.in_range("fraction", FLAGS.fraction, 0.0, 1.0, low_open=False)
    common.parse_data_spec(data)
    if not demo:
        common.model_dir(FLAGS.model, fetch=False)
    output_dir = FLAGS.output_dir or os.path.join(
        "results", f"unit_plot-{'demo' if demo else os.path.basename(os.path.normpath(FLAGS.model))}-{layer}-"
        f"{'best' if FLAGS.unit is None else FLAGS.unit}")
    identity = {n: getattr(FLAGS, n) for n in ("model", "unit", "class_order", "pre_relu", "segmenter",
                                               "concept", "fraction", "batch_size", "num_images", "on_bad_image")}
    identity.update(layer=layer, data=data, classes=classes)
    common.check_output_dir(output_dir, identity, overwrite=FLAGS.overwrite)
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    from jaxdissect.pipelines import demo as demo_lib

    model = FLAGS.model or demo_lib.model_dir(common.cache_dir(FLAGS.cache_dir), log=common.log)
    run(model, layer, FLAGS.unit, data, output_dir, classes=classes, segmenter=FLAGS.segmenter,
        concept=FLAGS.concept, fraction=FLAGS.fraction, pre_relu=FLAGS.pre_relu, batch_size=FLAGS.batch_size,
        num_images=FLAGS.num_images, on_bad_image=FLAGS.on_bad_image, class_order=FLAGS.class_order)


if __name__ == "__main__":
    define_flags()
    common.run(main)
