r"""Generator interventions: remove a concept by ablating units, insert one in context.

With no flags, a first look on the embedded demo: the planted toy generator
(red, green and blue units at ``layer4``; ``jaxdissect.models.toy_generator``)
and its colour labels, its dissection made once in ``--cache_dir`` (nothing is
downloaded); red is removed and green inserted, on 200 samples::

  python -m launch.intervene_generator

Dissect the layer first, with the same segmenter, then run, e.g. for the
paper's church ProGAN at layer4 (trees removed, doors inserted)::

  python -m launch.dissect --model=proggan_church --layers=layer4 \
      --segmenter=netpqc \
      --output_dir=results/progan-church-netpqc-layer4-10
  python -m launch.intervene_generator --model=proggan_church --layer=layer4 \
      --segmenter=netpqc \
      --dissection=results/progan-church-netpqc-layer4-10 \
      --output_dir=results/progan-church-layer4-interventions

The features of another basis of the layer (``--basis``, e.g. a TopK sparse
autoencoder the dissection trained: ``--basis=sae:2,k=2``) are removed and
inserted the same way, through ``jaxdissect.layers.FeatureEdit``; the
dissection must hold the layer in that basis (``launch.dissect --basis=...``;
the demo dissects the toy in it first)::

  python -m launch.intervene_generator --basis=sae:2,k=2

Outputs (JSON, npz, plots, image grids) are listed in
:mod:`jaxdissect.pipelines.intervene_generator`. Interrupted, the same command
resumes.
"""

import os

from absl import flags

from launch import common

FLAGS = flags.FLAGS
DEFAULTS = dict(layer="layer4", remove="tree", remove_units=30, insert="door", insert_units=20, num_samples=10000,
                min_samples=1000)
DEMO = dict(layer="layer4", remove="red", remove_units=4, insert="green", insert_units=4, num_samples=200,
            min_samples=20)


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted generator directory (python -m converters.proggan ...); absent: the "
                             "planted toy generator.")

    def default(name):
        return f"default {DEFAULTS[name]}; demo {DEMO[name]}"

    flags.DEFINE_string("layer", None, f"Layer to intervene on ({default('layer')}).")
    flags.DEFINE_string("segmenter", None, "upp=<dir>[,color=<dir>][,setting=netpqc]: the dissection's segmenter "
                        "(demo: the toy's colour labels).")
    flags.DEFINE_string("dissection", None, "Output directory of launch.dissect for this model and layer (demo: "
                        "made once in --cache_dir).")
    flags.DEFINE_string("remove", None, f"Concept to remove by ablating its top units, '' to skip ({default('remove')}).")
    flags.DEFINE_integer("remove_units", None, f"Ablate the top 1..N units of the removed concept "
                         f"({default('remove_units')}).")
    flags.DEFINE_string("insert", None, f"Concept to insert by switching its top units on, '' to skip "
                        f"({default('insert')}).")
    flags.DEFINE_integer("insert_units", None, f"Number of top units switched on for the inserted concept "
                         f"({default('insert_units')}).")
    flags.DEFINE_float("insert_quantile", 0.995, "Units are set to this quantile of their activations.")
    flags.DEFINE_bool("single_units", False, "Also ablate every single unit of the layer.")
    flags.DEFINE_string("basis", None, "Intervene on the features of this basis of the layer (neurons, "
                        "rotation:ALPHA[:SEED], sae:EXPANSION[,k=K], probe:net2vec), as --dissection dissected them "
                        "(default: the layer's units).")
    flags.DEFINE_integer("num_samples", None, f"Number of z samples, the original's seed-1 samples "
                         f"({default('num_samples')}).")
    flags.DEFINE_integer("seed", 1, "Seed of the z samples.")
    flags.DEFINE_integer("batch_size", 25, "Samples per step.")
    flags.DEFINE_integer("min_samples", None, f"Contexts seen fewer times are left out of the insertion report "
                         f"({default('min_samples')}).")
    common.define_output_flags("Where the results go (default results/intervene_generator-<model>-<layer>).")
    common.define_cache_dir_flag()


def main(argv):
    del argv
    demo = FLAGS.model is None
    if not demo:
        missing = [n for n in ("segmenter", "dissection") if not getattr(FLAGS, n)]
        if missing:
            raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    elif FLAGS.segmenter or FLAGS.dissection:
        raise common.LaunchError("--segmenter and --dissection need --model (the toy brings its own)")
    settings = {k: getattr(FLAGS, k) if getattr(FLAGS, k) is not None else (DEMO if demo else DEFAULTS)[k]
                for k in DEFAULTS}
    for name in ("remove_units", "insert_units", "num_samples", "min_samples"):
        common.positive(name, settings[name], allow_none=False)
    common.positive("batch_size", FLAGS.batch_size, allow_none=False)
    common.in_range("insert_quantile", FLAGS.insert_quantile, 0.0, 1.0)
    output_dir = FLAGS.output_dir or os.path.join(
        "results", f"intervene_generator-{'toy' if demo else os.path.basename(os.path.normpath(FLAGS.model))}-"
        f"{settings['layer']}")
    common.set_resume_hint(f"run the same command to resume ({output_dir})")
    identity = {n: getattr(FLAGS, n) for n in ("model", "segmenter", "dissection", "insert_quantile", "single_units",
                                               "seed")}
    identity.update(settings)
    if FLAGS.basis:
        from jaxdissect.bases import BasisError, spec

        try:
            identity["basis"] = spec.parse(FLAGS.basis).text
        except BasisError as e:
            raise common.LaunchError(f"--basis={FLAGS.basis}: {e}") from None
    common.check_output_dir(output_dir, identity, overwrite=FLAGS.overwrite)
    from jaxdissect.data.latents import standard_z_sample
    from jaxdissect.pipelines import intervene_generator as experiment

    if demo:
        from jaxdissect.models import toy_generator as toy
        from jaxdissect.pipelines import demo as demo_lib

        module, variables = toy.toy_generator()
        segmenter, segmenter_variables = demo_lib.toy_segmenter()
        if identity.get("basis", "neurons") == "neurons":
            dissection_dir = demo_lib.toy_dissection(common.cache_dir(FLAGS.cache_dir), settings["layer"])
        else:  # the toy dissected in that basis, beside the results (resumable)
            from jaxdissect.pipelines.toy import dissect_toy

            dissection_dir = os.path.join(output_dir, "dissection")
            dissect_toy(dissection_dir, settings["layer"], basis=identity["basis"],
                        cache_dir=common.cache_dir(FLAGS.cache_dir))
        z = toy.sample_z(settings["num_samples"], seed=FLAGS.seed)
    else:
        from jaxdissect.checkpoint import load_model
        from jaxdissect.segmentation import segmenter_from_spec

        module, variables = load_model(FLAGS.model)
        segmenter, segmenter_variables = segmenter_from_spec(common.segmenter_spec(FLAGS.segmenter))
        dissection_dir = FLAGS.dissection
        z = standard_z_sample(settings["num_samples"], seed=FLAGS.seed)
    layer, basis = settings["layer"], None
    if identity.get("basis"):
        from jaxdissect.bases import BasisError
        from jaxdissect.layers import layer_shapes
        from jaxdissect.pipelines.bases import dissected_view

        channels = int(layer_shapes(module, variables, z[:1])[layer].shape[-1])
        try:
            view, basis = dissected_view(dissection_dir, layer, identity["basis"], channels)
        except BasisError as e:
            raise common.LaunchError(f"--basis={FLAGS.basis}: {e}") from None
    else:
        view = layer
    dissection = experiment.load_dissection(dissection_dir, view)
    summaries = experiment.run_experiment(
        module, variables, layer, segmenter, segmenter_variables, dissection, z, basis=basis,
        output_dir=output_dir, remove=settings["remove"] or None, remove_units=settings["remove_units"],
        insert=settings["insert"] or None, insert_units=settings["insert_units"],
        insert_quantile=FLAGS.insert_quantile, single_units=FLAGS.single_units, batch_size=FLAGS.batch_size,
        min_samples=settings["min_samples"])
    print(f"results in {output_dir}: " + ", ".join(sorted(summaries)))


if __name__ == "__main__":
    define_flags()
    common.run(main)
