r"""Which units an adversarial attack changes (PNAS 2020, Fig. 7).

With no flags, a first look on the embedded demo (the small CNN trained once on
synthetic scenes and its ``conv4`` units ranked per class, both cached in
``--cache_dir``; nothing is downloaded): 8 scenes attacked toward kitchen and
toward beach with PGD (seconds; Carlini-Wagner with ``--attack=cw``)::

  python -m launch.adversarial

For VGG16-Places365 at conv5_3 with the paper's five target classes, after the
classifier ablation experiment (``python -m launch.ablate_classifier``) has
ranked the units::

  python -m launch.adversarial --model=vgg16_places365 --layer=conv5_3 \
      --data=places:val --ablation=results/vgg16-places-conv5_3-ablation \
      --output_dir=results/vgg16-adversarial

Per target class the first ``--num_images`` images whose label and prediction
are not the target are attacked (labels are matched to the model's classes
by name, ``jaxdissect.data.classes``; ``--class_order=sorted_folders`` for a
model without names) (Carlini-Wagner L2, or ``--attack=pgd``); the
peak activation change of the target's and the source's 4 most important units
and of all others goes to ``adversarial.json`` and ``adversarial.png``; images
to ``<target>/images.npz`` and ``<target>/examples.png``. Interrupted, the same
command resumes.
"""

from __future__ import annotations

import os

from absl import flags

from launch import common

FLAGS = flags.FLAGS


DEMO = dict(layer="conv4", data="synthetic:256", targets=("kitchen", "beach"), num_images=8, attack="pgd")


def run(model: str, data: str, ablation, output_dir: str, *, layer: str = "conv5_3",
        targets=None, num_images: int = 1000, attack: str = "cw", steps: int | None = None,
        eps: float | None = None, batch_size: int = 16, on_bad_image: str = "raise",
        class_order: str = "metadata") -> dict:
    """Load the model and data, run the experiment, print the headline numbers, return the summary.

    ``ablation``: the ablation experiment's directory, or a function returning it
    (the demo's ranking, made only once the data have been matched to the model).
    """
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.data import classes as class_lib
    from jaxdissect.pipelines.adversarial import PAPER_TARGETS, adversarial_units
    from launch.common import LaunchError, make_data, model_preprocessing

    module, variables = load_model(model)
    meta = load_metadata(model) or {}
    preprocessing = model_preprocessing(meta, path=model)
    normalization = preprocessing["normalization"]
    source, _ = make_data(data, kind="classifier", on_bad_image=on_bad_image, preprocessing=preprocessing)
    source = class_lib.model_labelled(source, meta.get("classes"), class_lib.num_outputs(module, variables, source),
                                      class_order=class_order, data=f"--data={data}", model=f"--model={model}")
    options = {}
    if steps is not None:
        options["steps"] = steps
    if eps is not None:
        if attack != "pgd":
            raise LaunchError("--eps applies to --attack=pgd only")
        options.update(eps=eps, step_size=eps / 4)
    if callable(ablation):
        ablation = ablation()
    summary = adversarial_units(module, variables, layer, source, output_dir, ablation_dir=ablation,
                                class_names=source.classes, targets=targets or PAPER_TARGETS, num_images=num_images,
                                attack=attack, attack_options=options, normalization=normalization, batch_size=batch_size)
    for name, t in summary["targets"].items():
        g = t["groups"]
        print(f"{name}: {t['succeeded']}/{t['attacked']} attacks succeeded; mean |peak change| target units "
              f"{g['target']['mean']:.4g}, source units {g['source']['mean']:.4g}, others {g['other']['mean']:.4g}")
    print(f"wrote {output_dir}/adversarial.json, adversarial.png and <target>/images.npz, examples.png")
    return summary


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted classifier directory (python -m converters.vgg16_places365 ...); absent: "
                             "the demo CNN.")
    flags.DEFINE_string("layer", None, f"Layer whose units are measured, as ranked by --ablation (default conv5_3; "
                        f"demo {DEMO['layer']}).")
    common.define_data_flag(f"Labelled images: {common.DATA_HELP}, e.g. places:val (demo: "
                            f"{DEMO['data']}).")
    flags.DEFINE_string("ablation", None, "Output directory of python -m launch.ablate_classifier for this layer "
                        "(demo: the demo model's ranking, made once in --cache_dir).")
    common.define_output_flags("Results directory (default results/adversarial-<model>-<layer>).")
    common.define_cache_dir_flag()
    flags.DEFINE_list("targets", None, "Target classes of the attack (default: the paper's bedroom, computer_room, "
                      f"hangar-indoor, ski_resort, volleyball_court-outdoor; demo {','.join(DEMO['targets'])}).")
    flags.DEFINE_integer("num_images", None, f"Images attacked per target class (default 1000; demo "
                         f"{DEMO['num_images']}).")
    flags.DEFINE_enum("attack", None, ["cw", "pgd"], "Carlini-Wagner L2 (the paper's, the default) or L-inf PGD "
                      f"(the demo's: {DEMO['attack']}, seconds instead of minutes).")
    flags.DEFINE_integer("steps", None, "Optimisation steps (default: 1000 for cw, 10 for pgd).")
    flags.DEFINE_float("eps", None, "PGD: L-inf radius in [0, 1] pixel units (default 8/255; step eps/4).")
    flags.DEFINE_integer("batch_size", 16, "Images attacked together.")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"], "Unreadable image: stop, or leave it out.")
    flags.DEFINE_enum("class_order", "metadata", ["metadata", "sorted_folders"],
                      "How the data's classes map to the model's outputs: by the names in model.json's "
                      "'classes', or output i = i-th class folder in sorted order.")


def main(argv):
    del argv
    demo = FLAGS.model is None
    if not demo:
        missing = [n for n in ("data", "ablation") if not getattr(FLAGS, n)]
        if missing:
            raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    for name in ("num_images", "batch_size"):
        common.positive(name, getattr(FLAGS, name))
    common.positive("steps", FLAGS.steps)
    common.in_range("eps", FLAGS.eps, 0.0, 1.0, high_open=False)
    attack = FLAGS.attack or (DEMO["attack"] if demo else "cw")
    if FLAGS.eps is not None and attack != "pgd":
        raise common.LaunchError("--eps applies to --attack=pgd only")
    data = FLAGS.data or DEMO["data"]
    common.parse_data_spec(data)
    if not demo:
        common.model_dir(FLAGS.model, fetch=False)
    layer = FLAGS.layer or (DEMO["layer"] if demo else "conv5_3")
    settings = dict(layer=layer, data=data, targets=FLAGS.targets or (list(DEMO["targets"]) if demo else None),
                    num_images=FLAGS.num_images or (DEMO["num_images"] if demo else 1000), attack=attack,
                    steps=FLAGS.steps)
    output_dir = FLAGS.output_dir or os.path.join(
        "results", f"adversarial-{'demo' if demo else os.path.basename(os.path.normpath(FLAGS.model))}-{layer}")
    identity = {n: getattr(FLAGS, n) for n in ("model", "ablation", "eps", "batch_size", "on_bad_image",
                                               "class_order")}
    identity.update(settings)
    common.check_output_dir(output_dir, identity, overwrite=FLAGS.overwrite,
                            remove=("selection.npz", "*/work", "*/images"))
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    from jaxdissect.pipelines import demo as demo_lib

    cache = common.cache_dir(FLAGS.cache_dir)
    model = FLAGS.model or demo_lib.model_dir(cache, log=common.log)
    ablation = FLAGS.ablation or (lambda: demo_lib.ablation_ranking(cache, layer, log=common.log))
    run(model, output_dir=output_dir, ablation=ablation, eps=FLAGS.eps,
        batch_size=FLAGS.batch_size, on_bad_image=FLAGS.on_bad_image, class_order=FLAGS.class_order, **settings)


if __name__ == "__main__":
    define_flags()
    common.run(main)
