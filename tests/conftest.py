"""Test-wide settings: CPU only, quiet logs, deterministic float32 matmuls, per-op YNNPACK convs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from jaxdissect.models import set_cpu_xla_flags  # noqa: E402

# Before JAX's first computation: XLA:CPU otherwise fuses a whole VGG body into one slow call.
set_cpu_xla_flags()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
