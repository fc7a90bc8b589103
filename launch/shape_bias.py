r"""Per-unit shape bias: do a unit's hot regions survive stylization?

With no flags, a first look on the embedded demo (the small CNN trained once on
synthetic scenes, and 64 scenes with a copy of each in other textures and
colours: same shapes, another style; all made once in ``--cache_dir``, nothing
is downloaded), at the demo model's 64-pixel input size::

  python -m launch.shape_bias

With Stylized Places made by ``python -m launch.stylize`` and (optionally) the
dissection of the same layers for the IoU >= 0.04 filter of the graphs::

  python -m launch.shape_bias --model=vgg16_places365 --layers=conv \
      --original=datasets/places/val --stylized=datasets/stylized-places/val \
      --dissection=results/vgg16-places-netpqc-10 --output_dir=results/vgg16-shape-bias

Writes per layer ``<layer>/shape_bias.npz`` and unit strips (``s_imgs/``
stylized, ``su_imgs/`` originals), plus ``shape_bias.json`` and
``shape_bias.png``. Images: shorter side 256, centre crop 256, as the
original. Interrupted, the same command resumes.
"""

from __future__ import annotations

import os

from absl import flags

from launch import common

FLAGS = flags.FLAGS


def run(model: str, original: str, stylized: str, output_dir: str, *, layers: str = "conv",
        dissection: str | None = None, batch_size: int = 10, num_images: int | None = None, size: int = 256) -> dict:
    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.layers import layer_shapes
    from jaxdissect.pipelines.shape_bias import PairedFolders, shape_bias
    from launch.dissect import parse_layers

    module, variables = load_model(model)
    norm = common.model_preprocessing(load_metadata(model), path=model)["normalization"]
    source = PairedFolders(original, stylized, normalization=norm, size=size)
    shapes = layer_shapes(module, variables, source.get_batch([0])["original"])
    names = parse_layers(layers, [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4])
    summary = shape_bias(module, variables, names, source, output_dir, dissection=dissection,
                         batch_size=batch_size, num_images=num_images)
    for name, s in summary["layers"].items():
        print(f"{name}: {s['shape_units']} of {s['graphed_units']} units score > 0.1 (mean score "
              f"{s['mean_score']:.3f})" if s["mean_score"] is not None else f"{name}: no unit graphed")
    print(f"wrote {output_dir}/shape_bias.json, shape_bias.png and <layer>/shape_bias.npz, s_imgs/, su_imgs/")
    return summary


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    common.define_model_flag("Converted classifier directory (its model.json gives the normalisation); absent: "
                             "the demo CNN.")
    flags.DEFINE_string("layers", "conv", "Layers as launch.dissect's --layers (conv, all, a..b, names).")
    flags.DEFINE_string("original", None, "Folder of the original images (demo: synthetic scenes).")
    flags.DEFINE_string("stylized", None, "Folder of their stylized copies (python -m launch.stylize; demo: the "
                        "scenes restyled).")
    flags.DEFINE_string("dissection", None, "Optional launch.dissect output dir: graph only units with IoU >= 0.04.")
    common.define_output_flags("Results directory (default results/shape_bias-<model>).")
    common.define_cache_dir_flag()
    flags.DEFINE_integer("batch_size", 10, "Image pairs per step.")
    flags.DEFINE_integer("num_images", None, "Only the first N pairs.")


def main(argv):
    del argv
    demo = FLAGS.model is None
    if not demo:
        missing = [n for n in ("original", "stylized") if not getattr(FLAGS, n)]
        if missing:
            raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    common.positive("batch_size", FLAGS.batch_size, allow_none=False)
    common.positive("num_images", FLAGS.num_images)
    if not demo:
        common.model_dir(FLAGS.model, fetch=False)
    for name in ("original", "stylized", "dissection"):
        if getattr(FLAGS, name) and not os.path.isdir(getattr(FLAGS, name)):
            raise common.LaunchError(f"--{name}={getattr(FLAGS, name)}: no such directory")
    if demo != (FLAGS.original is None) or demo != (FLAGS.stylized is None):
        raise common.LaunchError("give --model, --original and --stylized together (or none of them for the demo)")
    output_dir = FLAGS.output_dir or os.path.join(
        "results", f"shape_bias-{'demo' if demo else os.path.basename(os.path.normpath(FLAGS.model))}")
    identity = {n: getattr(FLAGS, n) for n in ("model", "layers", "original", "stylized", "dissection", "batch_size",
                                               "num_images")}
    common.check_output_dir(output_dir, identity, overwrite=FLAGS.overwrite)
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    if demo:
        from jaxdissect.pipelines import demo as demo_lib
        from jaxdissect.pipelines.train_synthetic import preprocessing

        cache = common.cache_dir(FLAGS.cache_dir)
        model, original = demo_lib.model_dir(cache, log=common.log), demo_lib.scene_folder(cache)
        stylized, size = demo_lib.restyled_folder(cache), preprocessing()["crop"]
    else:
        model, original, stylized, size = FLAGS.model, FLAGS.original, FLAGS.stylized, 256
    run(model, original, stylized, output_dir, layers=FLAGS.layers, dissection=FLAGS.dissection,
        batch_size=FLAGS.batch_size, num_images=FLAGS.num_images, size=size)


if __name__ == "__main__":
    define_flags()
    common.run(main)
