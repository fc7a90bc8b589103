r"""Classifier unit ablation: which units of a layer each class needs.

With no flags, a first look on the embedded demo (the small CNN trained once on
synthetic scenes, cached in ``--cache_dir``; nothing is downloaded): its
``conv4`` units ranked on 256 of its training scenes, evaluated on 256 others::

  python -m launch.ablate_classifier

For VGG16-Places365 at conv5_3, as in the paper::

  python -m launch.ablate_classifier --model=vgg16_places365 --layer=conv5_3 \
      --data=places:val --train_data=places:train \
      --class_order=sorted_folders \
      --iou=results/vgg16-places-netpqc-conv5_3-10/conv5_3/report.json \
      --output_dir=results/vgg16-places-conv5_3-ablation

The features of another basis of the layer work as units (``--basis``): each is
removed by ``jaxdissect.layers.FeatureEdit`` (its decoded contribution
subtracted, the reconstruction error kept). A learned basis is read from the
dissection ``--iou`` names (its ``<layer>@<basis>/basis/``: the dissected
features), else trained from ``--train_data`` (an SAE; a probe needs the data's
segmentation), once, in ``--cache_dir``::

  python -m launch.ablate_classifier --basis=sae:2,k=8

Per class: units ranked by train balanced accuracy after single-unit ablation,
then on val the top n units ablated, and only the top n kept. Outputs in
``--output_dir``: ``summary.json``, ``results.npz``, ``ice-all-classes.png``,
``ice-one-class.png``, ``ice-vs-iou.png`` and the cached count files
(``pra_*.npz``). Interrupted, the same command resumes; finished pieces are
never recomputed.

The images are read with the model's own preprocessing (``preprocessing`` in
its ``model.json``), and the class folders are matched to the model's outputs
by name through ``classes`` in ``model.json`` (``jaxdissect.data.classes``);
without that list, ``--class_order=sorted_folders`` states that output ``i`` is
the ``i``-th class folder in sorted order (true of Places365 and the converted
VGG16). A folder that is not a class of the model is an error.
"""

from __future__ import annotations

import os
import re

from absl import flags

from launch import common
from launch.common import LaunchError

FLAGS = flags.FLAGS
SIZES = (1, 2, 3, 4, 5, 20, 64, 128, 256)
DEMO = dict(layer="conv4", data="synthetic:256", train_images=256, sizes=(1, 2, 4, 8, 16, 32))


def image_source(spec: str, preprocessing: dict, on_bad_image: str, flag: str = "data"):
    """A labelled source: ``places:<dir>`` (or a bare ``<dir>``), ``tfds:places365_small[:split]`` or ``synthetic:<n>``."""
    scheme = spec.partition(":")[0]
    if scheme not in common.DATA_SCHEMES:
        spec = f"places:{spec}"
        scheme = "places"
    if scheme not in ("places", "tfds", "synthetic"):
        raise LaunchError(f"--{flag}={spec}: give labelled images, places:<dir> (class folders "
                          "<dir>/<class>/<image>), tfds:places365_small[:split] or synthetic:<count>")
    source, _ = common.make_data(spec, preprocessing=preprocessing, on_bad_image=on_bad_image, flag=flag)
    return source


def run(model: str, data: str, train_data, output_dir: str, *, layer: str = "conv5_3", sizes=SIZES,
        plot_class: str | None = None, full_classes=(), iou: str | None = None,
        batch_size: int = 32, num_images: int | None = None, train_images: int | None = None,
        method: str = "auto", on_bad_image: str = "raise", class_order: str = "metadata",
        overwrite: bool = False, basis: str | None = None, cache_dir: str | None = None) -> dict:
    """Load the model and data, run the experiment, print the headline numbers, return the summary.

    ``train_data``: a ``--data`` spec, or a labelled source (the demo's training scenes). ``basis``: a basis
    spec whose features are ablated instead of the units (learned bases kept in ``cache_dir``).
    """
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.data import classes as class_lib
    from jaxdissect.pipelines.ablate_classifier import classifier_ablation_experiment

    try:
        sizes = [int(s) for s in sizes]
    except ValueError:
        raise LaunchError(f"--sizes={','.join(map(str, sizes))}: give integers, e.g. --sizes=1,2,3,4,5,20") from None
    model = common.model_dir(model)
    if not os.path.isdir(model):
        raise LaunchError(f"--model={model}: no such directory; convert the classifier first "
                          "(python -m converters.vgg16_places365 ...)")
    train_spec = train_data if isinstance(train_data, str) else getattr(train_data, "fingerprint", dict)()
    identity = {"model": os.path.abspath(model), "layer": layer, "data": data, "train_data": train_spec,
                "num_images": num_images, "train_images": train_images, "on_bad_image": on_bad_image,
                "class_order": class_order}
    if basis:
        from jaxdissect.bases import BasisError, spec

        try:
            identity["basis"] = basis = spec.parse(basis).text
        except BasisError as e:
            raise LaunchError(f"--basis={basis}: {e}") from None
    # The cached pieces are named, not keyed by the data: a directory of other settings is refused.
    common.check_output_dir(output_dir, identity, overwrite=overwrite,
                            remove=("pra_*.npz", "summary.json", "results.npz", "basis.json"))
    module, variables = load_model(model)
    meta = load_metadata(model) or {}
    preprocessing = common.model_preprocessing(meta, path=model)
    val = image_source(data, preprocessing, on_bad_image)
    train = (image_source(train_data, preprocessing, on_bad_image, flag="train_data")
             if isinstance(train_data, str) else train_data)
    outputs = class_lib.num_outputs(module, variables, val)
    val = class_lib.model_labelled(val, meta.get("classes"), outputs, class_order=class_order,
                                   data=f"--data={data}", model=f"--model={model}")
    train = class_lib.model_labelled(train, meta.get("classes"), outputs, class_order=class_order,
                                     data="--train_data", model=f"--model={model}")  # each on its own: same outputs
    features = None if basis in (None, "neurons") else _basis(basis, module, variables, layer, train, iou,
                                                              batch_size, train_images, cache_dir)
    bars: dict = {}

    def progress(what, b, n):
        from jaxdissect.progress import progress as bar

        if what not in bars:
            bars[what] = bar(total=n, desc=what, unit="batch")
        bars[what].update(b - bars[what].n)
        if b == n:
            bars.pop(what).close()

    summary = classifier_ablation_experiment(
        module, variables, layer, val, train, output_dir, class_names=val.classes, sizes=sizes,
        plot_class=plot_class, full_classes=full_classes, iou_path=iou, batch_size=batch_size,
        val_items=num_images, train_items=train_images, method=method, progress=progress, basis=features)
    mba = summary["mean_balanced_accuracy"]
    print(f"val accuracy with all units: {summary['val_accuracy']:.4f}")
    print(f"mean balanced single-class accuracy on val: {mba['val_baseline']:.3f} with all units")
    for n in sizes:
        print(f"  n = {n}: top n removed {mba['ablate_top'][str(n)]:.3f}, only top n kept "
              f"{mba['keep_only_top'][str(n)]:.3f}")
    print(f"wrote {output_dir}/summary.json, results.npz and plots")
    return summary


def _basis(text, module, variables, layer, train, iou, batch_size, train_images, cache_dir):
    """``(basis, params)`` of ``--basis``: the dissected one beside ``--iou``'s report, else built or trained."""
    from jaxdissect.bases import BasisError
    from jaxdissect.layers import layer_shapes
    from jaxdissect.pipelines import bases

    try:
        if iou and iou.endswith(".json"):
            view_dir = os.path.dirname(os.path.abspath(iou))
            x = train.get_batch([0])["image"][:1]
            channels = int(layer_shapes(module, variables, x)[layer].shape[-1])
            _, found = bases.dissected_view(os.path.dirname(view_dir), layer, text, channels)
            return found
        basis, params, _ = bases.layer_basis(text, module, variables, layer, train, batch_size=batch_size,
                                             num_images=train_images, cache_dir=common.cache_dir(cache_dir),
                                             log=common.log)
        return basis, params
    except BasisError as e:
        raise LaunchError(f"--basis={text}: {e}") from None


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted classifier directory (python -m converters.vgg16_places365 ...); absent: "
                             "the demo CNN.")
    flags.DEFINE_string("layer", None, f"Layer whose units are ablated (default conv5_3; demo {DEMO['layer']}).")
    common.define_data_flag("Evaluation images: places:<dir> with class folders <dir>/<class>/<image> "
                            f"(a bare <dir> too), tfds:places365_small[:split] or synthetic:<count> (demo: "
                            f"{DEMO['data']}).")
    flags.DEFINE_string("train_data", None, "Images the units are ranked on (same forms as --data; demo: 256 of "
                        "the scenes it was trained on).")
    common.define_output_flags("Results and cache directory (created; reused to resume; default "
                               "results/ablate_classifier-<model>-<layer>).")
    common.define_cache_dir_flag()
    flags.DEFINE_list("sizes", None, f"Numbers n of top units per class (default {','.join(map(str, SIZES))}; demo "
                      f"{','.join(map(str, DEMO['sizes']))}).")
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
    flags.DEFINE_string("basis", None, "Ablate the features of this basis of the layer instead of its units: "
                        "rotation:ALPHA[:SEED], sae:EXPANSION[,k=K] or probe:net2vec (the one dissected beside "
                        "--iou's report, else trained from --train_data).")
    flags.DEFINE_enum("class_order", "metadata", ["metadata", "sorted_folders"],
                      "How class folders map to model outputs: by the names in model.json's 'classes', or "
                      "output i = i-th class folder in sorted order.")


def main(argv):
    del argv
    demo = FLAGS.model is None
    if not demo:
        missing = [n for n in ("data", "train_data") if not getattr(FLAGS, n)]
        if missing:
            raise LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    common.positive("batch_size", FLAGS.batch_size, allow_none=False)
    common.positive("num_images", FLAGS.num_images)
    common.positive("train_images", FLAGS.train_images)
    layer = FLAGS.layer or (DEMO["layer"] if demo else "conv5_3")
    tag = "" if not FLAGS.basis else "-" + re.sub(r"[^A-Za-z0-9.]+", "_", FLAGS.basis).strip("_")
    output_dir = FLAGS.output_dir or os.path.join(
        "results", f"ablate_classifier-{'demo' if demo else os.path.basename(os.path.normpath(FLAGS.model))}-{layer}"
        + tag)
    common.set_resume_hint(f"run the same command to resume ({output_dir})")
    from jaxdissect.pipelines import demo as demo_lib

    train_data = FLAGS.train_data or demo_lib.training_scenes(DEMO["train_images"])
    model = FLAGS.model or demo_lib.model_dir(common.cache_dir(FLAGS.cache_dir), log=common.log)
    run(model, FLAGS.data or DEMO["data"], train_data, output_dir, layer=layer,
        sizes=FLAGS.sizes or (DEMO["sizes"] if demo else SIZES), plot_class=FLAGS.plot_class,
        full_classes=FLAGS.full_classes, iou=FLAGS.iou, batch_size=FLAGS.batch_size, num_images=FLAGS.num_images,
        train_images=FLAGS.train_images, method=FLAGS.method, on_bad_image=FLAGS.on_bad_image,
        class_order=FLAGS.class_order, overwrite=FLAGS.overwrite, basis=FLAGS.basis, cache_dir=FLAGS.cache_dir)


if __name__ == "__main__":
    define_flags()
    common.run(main)
