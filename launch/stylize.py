r"""A stylized copy of an image folder (Stylized Places), one painting per image.

With no flags, a first look on the embedded demo: 16 synthetic scenes in the
colours of 8 abstract paintings (both made once in ``--cache_dir``) through an
AdaIN whose weights are set by hand (no trained weights ship, nothing is
downloaded: its features are each 8x8 block's colour range, so the output
keeps the scene's layout, blurred, in the painting's colour statistics; it
shows the pairing, naming and resuming, not brushwork), into
``results/stylize-demo``::

  python -m launch.stylize

After converting the AdaIN weights (``python -m converters.adain``)::

  python -m launch.stylize --model=models/adain --content=datasets/places/val \
      --styles=datasets/painter-by-numbers/train --output=datasets/stylized-places/val --seed=0

Writes ``<output>/<class>/<stem>-stylized-<painting stem>.jpg``; the pairing
is drawn from ``--seed`` (the same seed gives the same pairs); an interrupted
run resumes, keeping the images already written.
"""

from __future__ import annotations

import os

from absl import flags

from launch import common

FLAGS = flags.FLAGS


DEMO = dict(num_images=16, style_size=128, output=os.path.join("results", "stylize-demo"))


def run(model, content: str, styles: str, output: str, *, seed: int = 0, style_size: int = 256,
        alpha: float = 1.0, num_images: int | None = None) -> dict:
    """Stylize ``content`` into ``output``; ``model`` is a converted AdaIN directory or ``(module, variables)``."""
    from jaxdissect.checkpoint import load_model
    from jaxdissect.pipelines.stylize import stylize_folder

    module, variables = load_model(model) if isinstance(model, str) else model
    counts = stylize_folder(module, variables, content, styles, output, seed=seed, style_size=style_size,
                            alpha=alpha, num_images=num_images)
    print(f"stylized {counts['written']} images, kept {counts['kept']} already there, into {output}")
    return counts


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    common.define_model_flag("Converted AdaIN directory (python -m converters.adain ...); absent: the demo's "
                             "hand-set AdaIN on synthetic scenes.")
    flags.DEFINE_string("content", None, "Folder of images to stylize (sub-folders are kept).")
    flags.DEFINE_string("styles", None, "Folder of paintings.")
    common.define_output_path_flag("output", "folder", f"Folder for the stylized copy (demo: {DEMO['output']}).")
    common.define_cache_dir_flag()
    flags.DEFINE_integer("seed", 0, "Seed of the content -> painting pairing.")
    flags.DEFINE_integer("style_size", None, f"Shorter side of the painting before encoding, 0 = keep (default "
                         f"256; demo {DEMO['style_size']}).")
    flags.DEFINE_float("alpha", 1.0, "Style strength in [0, 1].")
    flags.DEFINE_integer("num_images", None, f"Only the first N content images (demo: {DEMO['num_images']}).")


def main(argv):
    del argv
    demo = FLAGS.model is None
    if not demo:
        missing = [n for n in ("content", "styles", "output") if not getattr(FLAGS, n)]
        if missing:
            raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    elif FLAGS.content or FLAGS.styles:
        raise common.LaunchError("--content and --styles need --model (the demo brings its own images)")
    common.positive("num_images", FLAGS.num_images)
    if FLAGS.style_size is not None and FLAGS.style_size < 0:
        raise common.LaunchError(f"--style_size={FLAGS.style_size}: give a size in pixels, or 0 to keep the size")
    common.in_range("alpha", FLAGS.alpha, 0.0, 1.0, low_open=False, high_open=False)
    for name in ("content", "styles"):
        if getattr(FLAGS, name) and not os.path.isdir(getattr(FLAGS, name)):
            raise common.LaunchError(f"--{name}={getattr(FLAGS, name)}: not a directory; give a folder of images")
    output = FLAGS.output or DEMO["output"]
    common.set_resume_hint(f"run the same command to resume (the images in {os.path.abspath(output)} are kept)")
    if demo:
        from jaxdissect.pipelines import demo as demo_lib

        cache = common.cache_dir(FLAGS.cache_dir)
        model, content, styles = demo_lib.planted_adain(), demo_lib.scene_folder(cache), demo_lib.painting_folder(cache)
    else:
        model, content, styles = FLAGS.model, FLAGS.content, FLAGS.styles
    style_size = FLAGS.style_size if FLAGS.style_size is not None else (DEMO["style_size"] if demo else 256)
    run(model, content, styles, output, seed=FLAGS.seed, style_size=style_size, alpha=FLAGS.alpha,
        num_images=FLAGS.num_images or (DEMO["num_images"] if demo else None))


if __name__ == "__main__":
    define_flags()
    common.run(main)
