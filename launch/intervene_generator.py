r"""Generator interventions: remove a concept by ablating units, insert one in context (spec 3.4).

Dissect the layer first, with the same segmenter, then run, e.g. for the
paper's church ProGAN at layer4 (trees removed, doors inserted)::

  python -m launch.dissect --model=models/proggan_church --layers=layer4 \
      --segmenter=upp=models/upp,color=models/color,setting=netpqc \
      --output_dir=results/progan-church-netpqc-layer4-10
  python -m launch.intervene_generator --model=models/proggan_church --layer=layer4 \
      --segmenter=upp=models/upp,color=models/color,setting=netpqc \
      --dissection=results/progan-church-netpqc-layer4-10 \
      --output_dir=results/progan-church-layer4-interventions

Outputs (JSON, npz, plots, image grids) are listed in
:mod:`jaxdissect.pipelines.intervene_generator`. Interrupted, the same command
resumes.
"""

from absl import flags

from launch import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted generator directory (python -m converters.proggan ...).")
    flags.DEFINE_string("layer", "layer4", "Layer to intervene on.")
    flags.DEFINE_string("segmenter", None, "upp=<dir>[,color=<dir>][,setting=netpqc]: the dissection's segmenter.")
    flags.DEFINE_string("dissection", None, "Output directory of launch.dissect for this model and layer.")
    flags.DEFINE_string("remove", "tree", "Concept to remove by ablating its top units ('' to skip).")
    flags.DEFINE_integer("remove_units", 30, "Ablate the top 1..N units of the removed concept.")
    flags.DEFINE_string("insert", "door", "Concept to insert by switching its top units on ('' to skip).")
    flags.DEFINE_integer("insert_units", 20, "Number of top units switched on for the inserted concept.")
    flags.DEFINE_float("insert_quantile", 0.995, "Units are set to this quantile of their activations.")
    flags.DEFINE_bool("single_units", False, "Also ablate every single unit of the layer.")
    flags.DEFINE_integer("num_samples", 10000, "Number of z samples (the original's seed-1 samples).")
    flags.DEFINE_integer("seed", 1, "Seed of the z samples.")
    flags.DEFINE_integer("batch_size", 25, "Samples per step.")
    flags.DEFINE_integer("min_samples", 1000, "Contexts seen fewer times are left out of the insertion report.")
    common.define_output_flags("Where the results go.")


def main(argv):
    del argv
    missing = [n for n in ("model", "segmenter", "dissection", "output_dir") if not getattr(FLAGS, n)]
    if missing:
        raise common.LaunchError(f"missing {', '.join('--' + n for n in missing)} (see --help)")
    for name in ("remove_units", "insert_units", "num_samples", "batch_size", "min_samples"):
        common.positive(name, getattr(FLAGS, name), allow_none=False)
    common.in_range("insert_quantile", FLAGS.insert_quantile, 0.0, 1.0)
    common.set_resume_hint(f"run the same command to resume ({FLAGS.output_dir})")
    identity = {n: getattr(FLAGS, n) for n in ("model", "layer", "segmenter", "dissection", "remove", "remove_units",
                                               "insert", "insert_units", "insert_quantile", "single_units",
                                               "num_samples", "seed", "min_samples")}
    common.check_output_dir(FLAGS.output_dir, identity, overwrite=FLAGS.overwrite)
    from jaxdissect.checkpoint import load_model
    from jaxdissect.data.latents import standard_z_sample
    from jaxdissect.pipelines import intervene_generator as experiment
    from jaxdissect.segmentation import segmenter_from_spec

    module, variables = load_model(FLAGS.model)
    segmenter, segmenter_variables = segmenter_from_spec(common.segmenter_spec(FLAGS.segmenter))
    dissection = experiment.load_dissection(FLAGS.dissection, FLAGS.layer)
    z = standard_z_sample(FLAGS.num_samples, seed=FLAGS.seed)
    summaries = experiment.run_experiment(
        module, variables, FLAGS.layer, segmenter, segmenter_variables, dissection, z,
        output_dir=FLAGS.output_dir, remove=FLAGS.remove or None, remove_units=FLAGS.remove_units,
        insert=FLAGS.insert or None, insert_units=FLAGS.insert_units, insert_quantile=FLAGS.insert_quantile,
        single_units=FLAGS.single_units, batch_size=FLAGS.batch_size, min_samples=FLAGS.min_samples)
    print(f"results in {FLAGS.output_dir}: " + ", ".join(sorted(summaries)))


if __name__ == "__main__":
    define_flags()
    common.run(main)
