r"""GANPaint-style painting app: paint and erase dissected concepts in generated images (and photos).

With no ``--model`` it serves the embedded planted toy generator and its
dissection (computed once, cached under ``~/.cache/jaxdissect``; nothing is
downloaded)::

  python -m launch.ganpaint --port=8080

then open http://127.0.0.1:8080/. A converted ProGAN and its dissection::

  python -m launch.ganpaint --model=proggan_church \
      --dissection=results/progan-church-netpqc --layer=layer4 --port=8080

The server binds 127.0.0.1; ``--host=0.0.0.0`` must be given to listen beyond
this machine. The JSON API is described in :mod:`jaxdissect.app.server`
and the README.
"""

from absl import flags, logging

from launch import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted generator directory; absent: the embedded toy generator.")
    flags.DEFINE_string("dissection", None, "launch.dissect output directory for --model (required with it).")
    flags.DEFINE_string("layer", None, "Layer the brushes edit (default layer4).")
    flags.DEFINE_string("encoder", None, "Converted inversion encoder dir (converters.proggan_encoder) to start "
                        "photo inversions from; absent: the nearest served sample.")
    flags.DEFINE_integer("invert_steps", 300, "Adam steps inverting an uploaded photo into the layer.")
    flags.DEFINE_integer("adapt_steps", 100, "Adam steps adapting the generator to an uploaded photo (0: none).")
    flags.DEFINE_integer("num_images", 16, "Generated images offered (ids 0..N-1, the RandomState(1) latents).")
    common.define_cache_dir_flag()
    flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on; give 0.0.0.0 explicitly to serve the network.")
    flags.DEFINE_integer("port", 8080, "Port to listen on.")


def main(argv):
    del argv
    common.positive("num_images", FLAGS.num_images, allow_none=False)
    common.positive("invert_steps", FLAGS.invert_steps, allow_none=False)
    if FLAGS.adapt_steps < 0:
        raise common.LaunchError(f"--adapt_steps={FLAGS.adapt_steps}: give 0 (no adaptation) or more steps")
    if not 0 <= FLAGS.port <= 65535:
        raise common.LaunchError(f"--port={FLAGS.port}: give a port in 0..65535")
    logging.set_verbosity(logging.WARNING)  # the first run's dissection would log every orbax checkpoint
    import uvicorn

    from jaxdissect.app import build_painter, create_app

    common.set_resume_hint("run the same command again (a cached dissection resumes where it stopped)")
    try:
        painter = build_painter(FLAGS.model, FLAGS.dissection, layer=FLAGS.layer, encoder=FLAGS.encoder,
                                num_images=FLAGS.num_images, cache_dir=common.cache_dir(FLAGS.cache_dir),
                                invert_steps=FLAGS.invert_steps, adapt_steps=FLAGS.adapt_steps)
    except ValueError as e:  # every problem with the model, dissection or encoder is reported in one line
        raise common.LaunchError(str(e)) from None
    common.set_resume_hint("the server stopped")
    print(f"ganpaint: {len(painter.concepts())} brushes on {painter.layer}; open http://{FLAGS.host}:{FLAGS.port}/")
    local = FLAGS.host in ("127.0.0.1", "localhost", "::1")
    hosts = ["127.0.0.1", "localhost", "[::1]"] if local else None  # no DNS rebinding onto a local server
    uvicorn.run(create_app(painter, allowed_hosts=hosts), host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    define_flags()
    common.run(main)
