r"""Which units an adversarial attack changes (PNAS 2020, Fig. 7).

For VGG16-Places365 at conv5_3 with the paper's five target classes, after the
classifier ablation experiment (``python -m launch.ablate_classifier``) has
ranked the units::

  python -m launch.adversarial --model=models/vgg16_places365 --layer=conv5_3 \
      --data=places:datasets/places/val --ablation=results/vgg16-places-conv5_3-ablation \
      --output_dir=results/vgg16-adversarial

Per target class the first ``--num_images`` images whose label and prediction
are not the target are attacked (Carlini-Wagner L2, or ``--attack=pgd``); the
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


def run(model: str, data: str, ablation: str, output_dir: str, *, layer: str = "conv5_3",
        targets=None, num_images: int = 1000, attack: str = "cw", steps: int | None = None,
        eps: float | None = None, batch_size: int = 16, on_bad_image: str = "raise") -> dict:
    """Load the model and data, run the experiment, print the headline numbers, return the summary."""
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.pipelines.adversarial import PAPER_TARGETS, adversarial_units
    from launch.common import LaunchError, make_data, model_preprocessing

    module, variables = load_model(model)
    meta = load_metadata(model) or {}
    preprocessing = model_preprocessing(meta, path=model)
    normalization = preprocessing["normalization"]
    source, _ = make_data(data, kind="classifier", on_bad_image=on_bad_image, preprocessing=preprocessing)
    classes = meta.get("classes") or getattr(source, "classes", None)
    if not classes:
        raise LaunchError(f"no class names: {model}/model.json has no 'classes' and {data} is not a class folder")
    options = {}
    if steps is not None:
        options["steps"] = steps
    if eps is not None:
        if attack != "pgd":
            raise LaunchError("--eps applies to --attack=pgd only")
        options.update(eps=eps, step_size=eps / 4)
    summary = adversarial_units(module, variables, layer, source, output_dir, ablation_dir=ablation,
                                class_names=classes, targets=targets or PAPER_TARGETS, num_images=num_images,
                                attack=attack, attack_options=options, normalization=normalization, batch_size=batch_size)
    for name, t in summary["targets"].items():
        g = t["groups"]
        print(f"{name}: {t['succeeded']}/{t['attacked']} attacks succeeded; mean |peak change| target units "
              f"{g['target']['mean']:.4g}, source units {g['source']['mean']:.4g}, others {g['other']['mean']:.4g}")
    print(f"wrote {output_dir}/adversarial.json, adversarial.png and <target>/images.npz, examples.png")
    return summary


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted classifier directory (python -m converters.vgg16_places365 ...).")
    flags.DEFINE_string("layer", "conv5_3", "Layer whose units are measured (as ranked by --ablation).")
    common.define_data_flag(f"Labelled images: {common.DATA_HELP}, e.g. places:datasets/places/val.")
    flags.DEFINE_string("ablation", None, "Output directory of python -m launch.ablate_classifier for this layer.")
    common.define_output_flags("Results directory.")
    flags.DEFINE_list("targets", None, "Target classes of the attack (default: the paper's bedroom, computer_room, "
                      "hangar-indoor, ski_resort, volleyball_court-outdoor).")
    flags.DEFINE_integer("num_images", 1000, "Images attacked per target class.")
    flags.DEFINE_enum("attack", "cw", ["cw", "pgd"], "Carlini-Wagner L2 (the paper's) or L-inf PGD.")
    flags.DEFINE_integer("steps", None, "Optimisation steps (default: 1000 for cw, 10 for pgd).")
    flags.DEFINE_float("eps", None, "PGD: L-inf radius in [0, 1] pixel units (default 8/255; step eps/4).")
    flags.DEFINE_integer("batch_size", 16, "Images attacked together.")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"], "Unreadable image: stop, or leave it out.")


def main(argv):
    del argv
    missing = [n for n in ("model", "data", "ablation", "output_dir") if not getattr(FLAGS, n)]
    if missing:
        raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    for name in ("num_images", "batch_size"):
        common.positive(name, getattr(FLAGS, name), allow_none=False)
    common.positive("steps", FLAGS.steps)
    common.in_range("eps", FLAGS.eps, 0.0, 1.0, high_open=False)
    if FLAGS.eps is not None and FLAGS.attack != "pgd":
        raise common.LaunchError("--eps applies to --attack=pgd only")
    common.parse_data_spec(FLAGS.data)
    common.model_dir(FLAGS.model, fetch=False)
    identity = {n: getattr(FLAGS, n) for n in ("model", "layer", "data", "ablation", "targets", "num_images",
                                               "attack", "steps", "eps", "batch_size", "on_bad_image")}
    common.check_output_dir(FLAGS.output_dir, identity, overwrite=FLAGS.overwrite,
                            remove=("selection.npz", "*/work", "*/images"))
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(FLAGS.output_dir)})")
    run(FLAGS.model, FLAGS.data, FLAGS.ablation, FLAGS.output_dir, layer=FLAGS.layer, targets=FLAGS.targets,
        num_images=FLAGS.num_images, attack=FLAGS.attack, steps=FLAGS.steps, eps=FLAGS.eps,
        batch_size=FLAGS.batch_size, on_bad_image=FLAGS.on_bad_image)


if __name__ == "__main__":
    define_flags()
    common.run(main)
