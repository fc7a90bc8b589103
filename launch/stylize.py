r"""A stylized copy of an image folder (Stylized Places, spec 3.5), one painting per image.

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


def run(model: str, content: str, styles: str, output: str, *, seed: int = 0, style_size: int = 256,
        alpha: float = 1.0, num_images: int | None = None) -> dict:
    from jaxdissect.checkpoint import load_model
    from jaxdissect.pipelines.stylize import stylize_folder

    module, variables = load_model(model)
    counts = stylize_folder(module, variables, content, styles, output, seed=seed, style_size=style_size,
                            alpha=alpha, num_images=num_images)
    print(f"stylized {counts['written']} images, kept {counts['kept']} already there, into {output}")
    return counts


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    common.define_model_flag("Converted AdaIN directory (python -m converters.adain ...).")
    flags.DEFINE_string("content", None, "Folder of images to stylize (sub-folders are kept).")
    flags.DEFINE_string("styles", None, "Folder of paintings.")
    flags.DEFINE_string("output", None, "Folder for the stylized copy.")
    flags.DEFINE_integer("seed", 0, "Seed of the content -> painting pairing.")
    flags.DEFINE_integer("style_size", 256, "Shorter side of the painting before encoding (0 = keep).")
    flags.DEFINE_float("alpha", 1.0, "Style strength in [0, 1].")
    flags.DEFINE_integer("num_images", None, "Only the first N content images.")


def main(argv):
    del argv
    missing = [n for n in ("model", "content", "styles", "output") if not getattr(FLAGS, n)]
    if missing:
        raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    common.positive("num_images", FLAGS.num_images)
    if FLAGS.style_size < 0:
        raise common.LaunchError(f"--style_size={FLAGS.style_size}: give a size in pixels, or 0 to keep the size")
    common.in_range("alpha", FLAGS.alpha, 0.0, 1.0, low_open=False, high_open=False)
    for name in ("content", "styles"):
        if not os.path.isdir(getattr(FLAGS, name)):
            raise common.LaunchError(f"--{name}={getattr(FLAGS, name)}: not a directory; give a folder of images")
    common.set_resume_hint(f"run the same command to resume (the images in {os.path.abspath(FLAGS.output)} are kept)")
    run(FLAGS.model, FLAGS.content, FLAGS.styles, FLAGS.output, seed=FLAGS.seed, style_size=FLAGS.style_size,
        alpha=FLAGS.alpha, num_images=FLAGS.num_images)


if __name__ == "__main__":
    define_flags()
    common.run(main)
