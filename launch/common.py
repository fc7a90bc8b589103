"""What every launcher shares: the ``--data`` grammar, common flags, validation, errors, Ctrl-C, quiet logs.

A launcher defines its flags in ``define_flags()`` (with the helpers below for
the shared ones), checks them at the top of ``main`` with :func:`positive`,
:func:`in_range` and :func:`parse_data_spec` (before any model is loaded or
trained), and runs through :func:`run`::

    def main(argv):
        common.positive("topk", FLAGS.topk)
        ...

    if __name__ == "__main__":
        define_flags()
        common.run(main)

:func:`run` gives every launcher the same behaviour: ``--help`` prints the
module docstring and the flags and exits 0; every path the launcher writes
(``--output_dir``, ``--output``, ``--cache_dir``: :data:`WRITABLE_FLAGS`) is
checked before any work, and one that cannot be written is a one-line error
naming it; :func:`check_output_dir` holds the output folder's lock for the
run, so a second run into it waits for the first; a bad flag or a known error
(:data:`KNOWN_ERRORS`, :class:`LaunchError`) prints one line ``error: ...``
(exit 2 for flag errors, 1 otherwise); Ctrl-C lets a running streaming pass
(``jaxdissect.streaming.run_stream``) finish its batch and checkpoint, prints
one line saying where the same command resumes, and exits 130 (a second
Ctrl-C stops at once; the checkpoints are written atomically either way).
Log lines lose absl's prefixes; orbax's INFO chatter and JAX's "Unable to
initialize backend" note are dropped; without an accelerator JAX is told to
use the CPU (``JAX_PLATFORMS=cpu`` unless set). Compiled XLA programs are kept
in the per-user cache (:func:`compilation_cache`), so a second run does not
compile the model, the segmenter and the kernels again.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import signal
import sys
from typing import Callable, Sequence

from jaxdissect.errors import JaxDissectError
from jaxdissect.fileio import default_cache_dir

SYNTHETIC_IMAGES = 512
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DATA_SCHEMES = ("places", "folder", "broden", "minilsun", "tfds", "z", "synthetic")
DATA_HELP = ("places:<dir>, folder:<dir>, broden:<dir>, tfds:places365_small[:split], z:<count>, synthetic:<count>, "
             "or a published data set by name (fetched once into the per-user cache): places (= places:val), "
             "places:train, broden (= broden:224), broden:227, broden:384, minilsun:<scene> (e.g. minilsun:church)")


class LaunchError(JaxDissectError, ValueError):
    """A flag value that cannot be used; the message says which and how to fix it."""


# --------------------------------------------------------------------------
# Flags


def define_model_flag(help: str = "Converted model directory (python -m converters.<model> ...), or a published "
                      "model by name, e.g. vgg16_places365 (python -m jaxdissect.zoo list).") -> None:
    """``--model``: the one name of the converted-model flag in every launcher."""
    from absl import flags

    flags.DEFINE_string("model", None, help)


def define_data_flag(help: str | None = None, name: str = "data") -> None:
    """``--data`` in the shared spec grammar (see :func:`make_data`)."""
    from absl import flags

    flags.DEFINE_string(name, None, help or f"Data: {DATA_HELP}.")


# Flags naming paths the launcher writes: name -> "folder" (created), "file" (its folder is created) or
# "cache" (the per-user cache; its default when absent). run() checks them before any work.
WRITABLE_FLAGS: dict[str, str] = {}


def define_output_flags(help: str = "Results directory.") -> None:
    """``--output_dir`` and ``--overwrite`` (see :func:`check_output_dir`)."""
    from absl import flags

    WRITABLE_FLAGS["output_dir"] = "folder"
    flags.DEFINE_string("output_dir", None, help + " A non-empty directory is refused unless it holds a run "
                        "of the same configuration (which then resumes) or --overwrite is given.")
    flags.DEFINE_bool("overwrite", False, "Replace the results of another configuration in --output_dir.")


def define_cache_dir_flag() -> None:
    """``--cache_dir`` (default :func:`default_cache_dir`)."""
    from absl import flags

    WRITABLE_FLAGS["cache_dir"] = "cache"
    flags.DEFINE_string("cache_dir", None, "Per-user cache (trained demo model, ...); default "
                        "$XDG_CACHE_HOME/jaxdissect or ~/.cache/jaxdissect.")


SEGMENTATION_CACHE_MB = 16384


def define_segmentation_cache_flag() -> None:
    """``--segmentation_cache_mb``: size budget of the segmentation cache under ``--cache_dir`` (0 = off)."""
    from absl import flags

    flags.DEFINE_integer("segmentation_cache_mb", SEGMENTATION_CACHE_MB, "Keep the segmenter's label maps in "
                         "<cache_dir>/segmentation, shared by every later run on the same data (which then does "
                         "not segment again), within this many MiB; 0 = no segmentation cache.")


def segmentation_cache(config: dict) -> tuple[str | None, int | None]:
    """``(root, budget in MiB)`` of the segmentation cache for ``jaxdissect.dissect``; ``(None, None)`` when off."""
    mb = config.get("segmentation_cache_mb", SEGMENTATION_CACHE_MB)
    if mb is None:
        mb = SEGMENTATION_CACHE_MB
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
        raise LaunchError(f"--segmentation_cache_mb={mb}: give a size in MiB >= 0 (0 turns the segmentation "
                          "cache off)")
    if mb == 0:
        return None, None
    return cache_dir(config.get("cache_dir")), mb


def define_output_path_flag(name: str, kind: str, help: str, default: str | None = None) -> None:
    """A flag naming a ``kind`` = ``'folder'`` or ``'file'`` the launcher writes (checked by :func:`run` up front)."""
    from absl import flags

    WRITABLE_FLAGS[name] = kind
    flags.DEFINE_string(name, default, help)


def cache_dir(value: str | None) -> str:
    """``--cache_dir`` if given, else :func:`default_cache_dir`."""
    return os.path.abspath(os.path.expanduser(value)) if value else default_cache_dir()


def compilation_cache() -> str | None:
    """Keep XLA's compiled programs in ``<cache dir>/xla``: a later run of any launcher skips compiling them.

    The cache directory is ``--cache_dir`` where the launcher has it, else
    :func:`default_cache_dir`. JAX's own settings win: with
    ``$JAX_COMPILATION_CACHE_DIR`` or ``$JAX_ENABLE_COMPILATION_CACHE`` set, nothing
    is changed. Returns the directory used (None when left to JAX).
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or "JAX_ENABLE_COMPILATION_CACHE" in os.environ:
        return None
    from absl import flags

    import jax

    value = flags.FLAGS["cache_dir"].value if "cache_dir" in flags.FLAGS else None
    directory = os.path.join(cache_dir(value), "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


# --------------------------------------------------------------------------
# Validation (call before any work)


def positive(name: str, value, *, allow_none: bool = True) -> None:
    """``--name`` must be an integer >= 1 (or absent when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LaunchError(f"--{name}={value}: must be a positive integer")


def in_range(name: str, value, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> None:
    """``--name`` must lie in the interval from ``low`` to ``high`` (open ends by default)."""
    if value is None:
        return
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise LaunchError(f"--{name}={value}: must lie in {interval}")


def parse_data_spec(spec: str, flag: str = "data") -> tuple[str, str]:
    """``(scheme, argument)`` of a ``--data`` spec, checked without reading any data.

    Folder schemes need a path; ``z:`` and ``synthetic:`` counts must be
    positive integers; only ``tfds:places365_small[:split]`` is supported.
    """
    from jaxdissect import zoo

    scheme, sep, arg = str(spec).partition(":")
    if scheme not in DATA_SCHEMES:
        raise LaunchError(f"--{flag}={spec}: unknown kind {scheme!r}; use {DATA_HELP}")
    if scheme == "minilsun" and not arg:
        raise LaunchError(f"--{flag}={spec}: give the scene, e.g. --{flag}=minilsun:church")
    if scheme in ("places", "folder", "broden") and not arg and not zoo.data_name(spec):
        raise LaunchError(f"--{flag}={spec}: give the folder, e.g. --{flag}={scheme}:/path/to/images")
    if scheme in ("z", "synthetic") and arg:
        try:
            count = int(arg)
        except ValueError:
            count = 0
        if count < 1:
            raise LaunchError(f"--{flag}={spec}: the count after {scheme}: must be a positive integer, "
                              f"e.g. --{flag}={scheme}:512")
    if scheme == "tfds" and arg.partition(":")[0] != "places365_small":
        raise LaunchError(f"--{flag}={spec}: only tfds:places365_small[:split] is supported")
    return scheme, arg


# --------------------------------------------------------------------------
# Data


def make_data(spec: str, *, kind: str = "classifier", crop: int = 224, on_bad_image: str = "raise",
              normalization: str = "imagenet", preprocessing: dict | None = None, flag: str = "data"):
    """A data source from a ``--data`` spec: returns ``(source, short name for the results directory)``.

    ``preprocessing`` is the model's own input pipeline from its ``model.json``
    (``{"normalization", "resize", "crop"}``); image folders are read with
    it. Without it, ``crop`` and ``normalization`` describe the classic
    classifier pipeline (resize 256, centre crop, ImageNet normalisation).
    ``kind`` is ``'classifier'`` or ``'generator'`` (``z:`` is for generators only).
    """
    from jaxdissect.data import folders, places

    scheme, arg = parse_data_spec(spec, flag)
    root = data_root(spec, flag) if scheme in ("places", "folder", "broden", "minilsun") else None
    if kind == "generator" and scheme != "z":
        raise LaunchError(f"--{flag}={spec}: a generator is dissected on z vectors (--{flag}=z:<count>)")
    pre = dict(preprocessing or {"normalization": normalization, "resize": 256, "crop": crop})
    transform = folders.transform_for(pre) if preprocessing or normalization != "imagenet" else None
    crop = int(pre.get("crop", crop) or crop)
    if scheme in ("places", "folder", "minilsun"):
        if not os.path.isdir(root):
            raise LaunchError(f"--{flag}={spec}: {root} is not a directory; give a folder of images")
        if scheme == "places":
            return places.PlacesFolder(root, crop=crop, transform=transform, on_error=on_bad_image), "places"
        name = f"minilsun-{arg}" if scheme == "minilsun" else os.path.basename(os.path.normpath(root))
        return folders.ImageFolder(root, crop=crop, transform=transform, on_error=on_bad_image), name
    if scheme == "tfds":
        split = arg.partition(":")[2]
        return places.Places365TFDS(split or "validation", crop=crop, transform=transform), "places365_small"
    if scheme == "broden":
        from jaxdissect.data import broden

        norm = pre.get("normalization", "imagenet")
        preprocess = broden.imagenet_normalize if norm == "imagenet" else broden.to_zc
        return broden.BrodenSource(root, preprocess=preprocess, on_error=on_bad_image), "broden"
    if scheme == "z":
        if kind != "generator":
            raise LaunchError(f"--{flag}={spec} feeds z vectors, but the model is a classifier; give images")
        n = int(arg or 10000)
        return folders.LatentSource(n), f"z{n}" if n != 10000 else "z"
    from jaxdissect.data.synthetic import SyntheticScenes

    return SyntheticScenes(int(arg or SYNTHETIC_IMAGES), seed=0), "synthetic"


def data_root(spec: str, flag: str = "data") -> str:
    """The folder of a folder-kind ``--data`` spec: its path as given, or a published data set by name
    (``places``, ``broden:227``, ``minilsun:church``; an existing path wins), fetched and unpacked on first use."""
    from jaxdissect import zoo

    arg = os.path.expanduser(str(spec).partition(":")[2])
    if (arg and os.path.exists(arg)) or not zoo.data_name(spec):
        return arg
    return zoo.data_dir(spec, flag=flag)


def model_dir(value: str, flag: str = "model", kind: str | None = None, fetch: bool = True) -> str:
    """A ``--model``/``--encoder``/... value as a directory: a converted model directory as given, or a published
    model by name, downloaded and converted into the per-user cache on first use (nothing fetched when
    ``fetch`` is False: the check before any work). An unusable value is a :class:`LaunchError` saying how
    to get a model."""
    from jaxdissect import zoo

    try:
        return zoo.model_dir(value, flag=flag, kind=kind, fetch_now=fetch)
    except zoo.UnknownName as e:
        raise LaunchError(str(e)) from None


def segmenter_spec(spec: str, fetch: bool = True) -> str:
    """A ``--segmenter`` value with published names (``netpqc``, ``upp``, ``color``) resolved to directories."""
    from jaxdissect import zoo

    try:
        return zoo.segmenter_spec(spec, fetch_now=fetch)
    except zoo.UnknownName as e:
        raise LaunchError(str(e)) from None


def model_preprocessing(metadata: dict, flag: str = "model", path: str = "") -> dict:
    """The ``preprocessing`` record of a classifier's ``model.json``; an error naming the fix if absent."""
    pre = (metadata or {}).get("preprocessing")
    if not isinstance(pre, dict) or not {"normalization", "crop"} <= set(pre):
        raise LaunchError(
            f"--{flag}={path}: model.json records no input preprocessing ('preprocessing': "
            "{'normalization': ..., 'resize': R, 'crop': C}); convert the model again with a current "
            "converter, or add that entry to model.json")
    return {"normalization": str(pre["normalization"]), "resize": int(pre.get("resize", 256)),
            "crop": int(pre["crop"])}


def model_kind(metadata: dict, module) -> str:
    """``'generator'`` (a z input, or a ProgressiveGenerator) or ``'classifier'``."""
    inp = metadata.get("input") or {}
    if inp.get("name") == "z" or type(module).__name__ == "ProgressiveGenerator":
        return "generator"
    return "classifier"


def data_preprocessing(metadata: dict, model_dir: str, data_spec: str) -> dict | None:
    """The classifier's input pipeline from model.json; required when the data are images to preprocess."""
    if data_spec.partition(":")[0] in ("synthetic", "z"):
        return None
    return model_preprocessing(metadata, path=model_dir)


# --------------------------------------------------------------------------
# Output directories


def check_output_dir(output_dir: str, config: dict, *, overwrite: bool = False, record: str = "launch.json",
                     remove: Sequence[str] = ("work",)) -> None:
    """Refuse a non-empty ``output_dir`` unless it holds a run of this ``config`` or ``overwrite`` is set.

    The folder must be writable (checked first, naming the path and why).
    Inside :func:`run` the run then holds the folder's lock (``.<record>.lock``)
    until the launcher returns: a second run into the same folder started
    meanwhile waits for it (saying so, up to ``$JAXDISSECT_LOCK_TIMEOUT``), then
    finds its results (a run of the same configuration resumes: nothing is
    recomputed). The configuration is written to ``output_dir/record`` so a
    rerun of the same command is recognised. With ``overwrite`` only the
    run's own resumable state (``remove``: names or glob patterns, e.g. the
    ``work`` directory and cached pieces) is deleted, so it is recomputed;
    the outputs are then rewritten in place and nothing else is touched.
    """
    import glob
    import json
    import shutil

    from jaxdissect import fileio

    fileio.require_writable_dir(output_dir, "output folder")
    lock = os.path.abspath(os.path.join(output_dir, f".{record}.lock"))
    if _HELD and lock not in _HELD[1]:
        _HELD[0].enter_context(fileio.lock(lock, what=f"the run writing {os.path.abspath(output_dir)}",
                                           log=log))
        _HELD[1].add(lock)
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    path = os.path.join(output_dir, record)
    if set(os.listdir(output_dir)) - {os.path.basename(lock), os.path.basename(lock) + ".owner"}:
        stored = None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    stored = json.load(f)
            except (OSError, ValueError):
                stored = None
        if stored != config:
            if not overwrite:
                what = "a run of other settings" if stored is not None else "files of its own"
                diff = ""
                if isinstance(stored, dict):
                    keys = sorted(k for k in set(stored) | set(config)
                                  if k not in stored or k not in config or stored[k] != config[k])
                    diff = f" (differing: {', '.join(keys)})"
                raise LaunchError(f"--output_dir={output_dir} is not empty: it holds {what}{diff}; choose "
                                  "another --output_dir, or pass --overwrite to replace its results")
            for pattern in list(remove) + [record]:
                for full in glob.glob(os.path.join(glob.escape(output_dir), pattern)):
                    if os.path.isdir(full) and not os.path.islink(full):
                        shutil.rmtree(full)
                    else:
                        os.remove(full)
    fileio.write_json(path, config, indent=1, sort_keys=True)


def writable_folder(path: str, what: str) -> None:
    """Check that ``path`` can be created (if missing) and written, leaving nothing behind; else one error.

    ``jaxdissect.fileio.require_writable_dir`` names the path and the reason
    (an existing file, no permission, a read-only file system, ...); folders it
    had to create for the check are removed again, so a run refused later (a
    bad flag) leaves no trace.
    """
    from jaxdissect import fileio

    full = os.path.abspath(os.path.expanduser(path))
    missing = []
    probe = full
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        missing.append(probe)
        probe = os.path.dirname(probe)
    fileio.require_writable_dir(full, what)
    for created in missing:  # deepest first; a folder another process filled meanwhile stays
        try:
            os.rmdir(created)
        except OSError:
            break


def check_writable_flags() -> None:
    """Every path flag the launcher writes (:data:`WRITABLE_FLAGS`) is a folder it can write: else one error.

    ``--cache_dir`` is checked whether given or not (its default is the
    per-user cache, which holds the compiled programs of every run).
    """
    from absl import flags

    from jaxdissect import fileio

    for name, kind in WRITABLE_FLAGS.items():
        if name not in flags.FLAGS:
            continue
        value = flags.FLAGS[name].value
        if kind == "cache":
            writable_folder(cache_dir(value), f"cache folder (--cache_dir{'' if value else ' default'})")
        elif not value:
            continue
        elif kind == "folder":
            writable_folder(value, f"--{name} folder")
        else:
            if os.path.isdir(value):
                raise fileio.FileIOError(f"--{name}={value} is a folder; give a file name, e.g. {value}/out.png")
            writable_folder(os.path.dirname(os.path.abspath(value)), f"folder of --{name}")


# --------------------------------------------------------------------------
# Environment, logs


def _accelerator_present() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0",
                                           "/dev/kfd"))


class _QuietFilter(std_logging.Filter):
    """Drops orbax's INFO lines and JAX's notes about backends it could not start."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):
            msg = str(record.msg)
        if "Unable to initialize backend" in msg or "An NVIDIA GPU may be present" in msg:
            return False
        if record.levelno < std_logging.WARNING and (f"{os.sep}orbax{os.sep}" in record.pathname
                                                     or record.name.startswith("orbax")):
            return False
        return True


def setup_environment() -> None:
    """CPU unless an accelerator is present, XLA:CPU flags, quiet TF/XLA C++ logs (before JAX starts)."""
    if "JAX_PLATFORMS" not in os.environ and not _accelerator_present():
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()


def quiet_logs() -> None:
    """Plain ``message`` log lines (no absl prefix); orbax INFO and backend-probe notes dropped."""
    from absl import logging

    handler = logging.get_absl_handler()
    handler.setFormatter(std_logging.Formatter("%(message)s"))
    quiet = _QuietFilter()
    handler.addFilter(quiet)
    for name in ("absl", "jax._src.xla_bridge", "orbax", ""):
        std_logging.getLogger(name).addFilter(quiet)
    for h in std_logging.getLogger().handlers:
        h.addFilter(quiet)


# --------------------------------------------------------------------------
# Errors, Ctrl-C, the main wrapper

_RESUME_HINT: list[str] = []
_HELD: list = []   # [ExitStack, lock paths] of the running launcher's locks (released when its main returns)


def log(message: str) -> None:
    """A progress line on stderr (what launchers say while they build the demo's cached pieces or wait)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def set_resume_hint(text: str) -> None:
    """What the Ctrl-C line says about resuming, e.g. ``"run the same command to resume (results/x)"``."""
    _RESUME_HINT[:] = [text]


def known_errors() -> tuple[type, ...]:
    """The error types whose message is the whole story (printed as ``error: ...``): every
    :class:`jaxdissect.errors.JaxDissectError`, the launchers' own included."""
    return (JaxDissectError,)


def _sigint(signum, frame) -> None:
    from jaxdissect import streaming

    if streaming.request_stop():  # a pass is running: it stops after its batch, checkpointed (again: at once)
        return
    raise KeyboardInterrupt


def _interrupted(e: BaseException) -> int:
    where = str(e).strip()
    hint = _RESUME_HINT[0] if _RESUME_HINT else "run the same command again to resume"
    sys.stderr.write(f"\ninterrupted{': ' + where if where else ''}; {hint}\n")
    sys.stderr.flush()
    return EXIT_INTERRUPTED


def _help_text(main_module) -> str:
    from absl import flags

    doc = (getattr(main_module, "__doc__", None) or "").strip()
    own = list(flags.FLAGS.get_key_flags_for_module(sys.argv[0]) or flags.FLAGS.get_key_flags_for_module(main_module))
    own += flags.FLAGS.get_key_flags_for_module(__name__)  # the shared flags defined through this module
    lines = [doc, "", "flags:"] if doc else ["flags:"]
    for flag in sorted(own, key=lambda f: f.name):
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    return "\n".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        sys.stdout.write(_help_text(sys.modules.get("__main__")) + "\n")
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], object], extra_errors: tuple[type, ...] = ()) -> None:
    """Run a launcher's ``main`` with the shared behaviour (see the module docstring); never returns."""
    from absl import app

    setup_environment()

    def wrapped(argv):
        quiet_logs()
        previous = signal.signal(signal.SIGINT, _sigint)
        try:
            if len(argv) > 1:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
            check_writable_flags()
            compilation_cache()
            with contextlib.ExitStack() as held:
                _HELD[:] = [held, set()]
                try:
                    main(argv)
                finally:
                    _HELD.clear()
        except KeyboardInterrupt as e:
            sys.exit(_interrupted(e))
        except app.UsageError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(EXIT_USAGE)
        except known_errors() + tuple(extra_errors) as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(EXIT_ERROR)
        finally:
            signal.signal(signal.SIGINT, previous)

    app.run(wrapped, flags_parser=_parse_flags)
