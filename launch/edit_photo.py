r"""Edit a photo with a GAN prior: paint or erase dissected concepts (GANPaint on real photos).

A church ProGAN with its inversion encoder, after dissecting layer4 at quantile 0.01::

  python -m launch.edit_photo --image=photo.jpg --model=proggan_church \
      --encoder=church --perceptual=vgg16_imagenet \
      --dissection=results/progan-church-netpqc-layer4-10 \
      --paint=tree:20,120,100,230 --erase=door:mask.png --output_dir=results/edit

``--paint``/``--erase`` take ``concept:x0,y0,x1,y1`` (a box in pixels of the
photo resized and centre-cropped to the generator's resolution) or
``concept:mask.png`` (painted = non-transparent, or white in a mask without
alpha); repeat them for several strokes (paints first, then erases).

With no ``--model`` it runs on the planted toy generator (32 px, red/green/blue
units at layer4), which it dissects once into the per-user ``--cache_dir``; without ``--image`` the photo
is a toy image with a colour shift the generator cannot make, and with no
stroke it paints red into the upper left quarter, into ``results/edit_photo-toy``::

  python -m launch.edit_photo
  python -m launch.edit_photo --paint=red:8,8,20,20 --output_dir=results/edit_toy

Writes ``input.png``, ``inversion.png``, ``adapted.png``, ``edit.png``,
``side_by_side.png``, ``losses.npz`` and ``summary.json`` to ``--output_dir``
and prints the reconstruction PSNRs.
"""

import os

from absl import flags

from launch import common

FLAGS = flags.FLAGS
TOY_OUTPUT = os.path.join("results", "edit_photo-toy")
TOY_PAINT = "red:0,0,16,16"


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    flags.DEFINE_string("image", None, "Photo to edit (absent with no --model: a toy demo image).")
    common.define_model_flag("Converted generator directory; absent: the planted toy generator.")
    flags.DEFINE_string("encoder", None, "Converted inversion encoder (python -m converters.proggan_encoder); "
                        "absent: start from the best of --init_samples random latents.")
    flags.DEFINE_string("perceptual", None, "Converted VGG16 directory for the perceptual loss (layer conv4_2); "
                        "absent: pixel L1 only.")
    flags.DEFINE_string("dissection", None, "launch.dissect output for --layer at quantile 0.01 "
                        "(absent with the toy: dissected once into --cache_dir).")
    flags.DEFINE_string("layer", "layer4", "Edit layer.")
    flags.DEFINE_multi_string("paint", [], "concept:x0,y0,x1,y1 or concept:mask.png to paint.")
    flags.DEFINE_multi_string("erase", [], "concept:x0,y0,x1,y1 or concept:mask.png to erase.")
    flags.DEFINE_string("strength", None, "Units per stroke: 4, 10, 15 or low/med/high (default 15; toy 4).")
    flags.DEFINE_list("adapt_layers", None, "Layers the adaptation perturbs (default layer8,10,12,14; toy "
                      "layer6,layer8).")
    flags.DEFINE_integer("invert_steps", None, "Inversion steps (default 3000; toy 300).")
    flags.DEFINE_integer("adapt_steps", None, "Adaptation steps (default 1000; toy 200).")
    flags.DEFINE_integer("init_samples", 64, "Random latents tried as the start when there is no --encoder.")
    common.define_output_flags("Where the images go (required with --model; toy default results/edit_photo-toy).")
    common.define_cache_dir_flag()


def _toy_photo():
    import numpy as np

    from jaxdissect.models import toy_generator as T

    module, variables = T.toy_generator()
    image = np.asarray(module.apply(variables, T.sample_z(1, seed=31)))
    return np.clip(image * np.array([0.8, 1.0, 1.15]) + np.array([0.1, -0.05, 0.0]), -1, 1).astype(np.float32)


def _check_flags() -> None:
    """Every check that needs no model (before JAX starts)."""
    if FLAGS.model and not FLAGS.output_dir:
        raise common.LaunchError("missing --output_dir (see --help)")
    for name in ("invert_steps", "adapt_steps"):
        common.positive(name, getattr(FLAGS, name))
    common.positive("init_samples", FLAGS.init_samples, allow_none=False)
    if FLAGS.strength is not None and not (FLAGS.strength.isdigit() and int(FLAGS.strength) > 0) \
            and FLAGS.strength not in ("low", "med", "high"):
        raise common.LaunchError(f"--strength={FLAGS.strength}: give a unit count (e.g. 4, 10, 15) or low/med/high")
    for name, kind in (("model", "generator"), ("encoder", "encoder"), ("perceptual", "classifier")):
        if getattr(FLAGS, name):
            common.model_dir(getattr(FLAGS, name), flag=name, kind=kind, fetch=False)
    if FLAGS.dissection and not os.path.isdir(FLAGS.dissection):
        raise common.LaunchError(f"--dissection={FLAGS.dissection}: no such directory")
    if FLAGS.image and not os.path.isfile(FLAGS.image):
        raise common.LaunchError(f"--image={FLAGS.image}: no such file")
    if FLAGS.model and not FLAGS.image:
        raise common.LaunchError("--image is required with --model")
    if FLAGS.model and not FLAGS.dissection:
        raise common.LaunchError(f"--dissection is required with --model: python -m launch.dissect "
                                 f"--model={FLAGS.model} --layers={FLAGS.layer} --quantile=0.01 ...")
    for spec in FLAGS.paint + FLAGS.erase:
        concept, sep, where = spec.partition(":")
        if not (concept and sep and where):
            raise common.LaunchError(f"--paint/--erase={spec!r}: expected concept:x0,y0,x1,y1 or concept:mask.png")


def main(argv):
    del argv
    from absl import logging

    _check_flags()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's per-checkpoint INFO lines off the progress bars
    toy = FLAGS.model is None
    output_dir = FLAGS.output_dir or TOY_OUTPUT
    paint = FLAGS.paint or ([TOY_PAINT] if toy and not FLAGS.erase else [])
    identity = {n: getattr(FLAGS, n) for n in ("image", "model", "encoder", "perceptual", "dissection", "layer",
                                               "erase", "strength", "adapt_layers", "invert_steps",
                                               "adapt_steps", "init_samples")}
    identity["paint"] = paint
    common.check_output_dir(output_dir, identity, overwrite=FLAGS.overwrite, remove=())
    common.set_resume_hint("nothing of the edit was saved; run the same command again to start it over")

    from jaxdissect.checkpoint import load_model
    from jaxdissect.editing import Brushes
    from jaxdissect.editing.adaptation import PROGGAN_ADAPT_LAYERS
    from jaxdissect.models import toy_generator as T
    from jaxdissect.pipelines import demo
    from jaxdissect.pipelines import edit_photo as pipeline

    if toy:
        module, variables = T.toy_generator()
    else:
        module, variables = load_model(FLAGS.model)
    encoder = load_model(common.model_dir(FLAGS.encoder, flag="encoder", kind="encoder")) if FLAGS.encoder else None
    perceptual = load_model(FLAGS.perceptual) if FLAGS.perceptual else None
    size = int(module.apply(variables, _zeros_like_latent(module)).shape[1])
    photo = pipeline.load_photo(FLAGS.image, size) if FLAGS.image else _toy_photo()
    dissection = FLAGS.dissection or demo.toy_dissection(common.cache_dir(FLAGS.cache_dir), FLAGS.layer)
    brushes = Brushes.from_dissection(dissection, FLAGS.layer)
    strength = FLAGS.strength or ("4" if toy else "15")
    strength = int(strength) if strength.isdigit() else strength
    strokes = [pipeline.parse_stroke(s, size, erase=False, strength=strength) for s in paint]
    strokes += [pipeline.parse_stroke(s, size, erase=True, strength=strength) for s in FLAGS.erase]
    for s in strokes:
        brushes.units(s.concept, s.strength)  # unknown concepts fail before the optimisations
    adapt_layers = FLAGS.adapt_layers or (T.ADAPT_LAYERS if toy else PROGGAN_ADAPT_LAYERS)
    summary = pipeline.edit_photo(
        module, variables, photo, strokes, brushes, output_dir, encoder=encoder, perceptual=perceptual,
        layer=FLAGS.layer, adapt_layers=adapt_layers,
        invert_steps=FLAGS.invert_steps or (300 if toy else 3000),
        adapt_steps=FLAGS.adapt_steps or (200 if toy else 1000), init_samples=FLAGS.init_samples)
    print(f"images in {output_dir}: side_by_side.png ({', '.join(summary['panels'])}), summary.json")


def _zeros_like_latent(module):
    import jax.numpy as jnp

    from jaxdissect.editing.strokes import latent_like

    return jnp.zeros(latent_like(module, 1).shape, jnp.float32)


if __name__ == "__main__":
    define_flags()
    common.run(main)
