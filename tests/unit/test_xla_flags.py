"""The XLA flags `import jaxsd` sets, and that they reach XLA."""
import os
import subprocess
import sys

from jaxsd import xla_flags

import helpers

ROOT = helpers.ROOT  # the repository

# Prints whether a compiled 3x3 convolution of MNIST size went to YNNPACK
# (XLA's default in jaxlib 0.10; tiny ones never do) or stayed an XLA
# convolution (jaxsd's flag), and XLA_FLAGS.
_PROBE = """
import os, jaxsd, jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(jnp.ones((8, 28, 28, 32)),
                          jnp.ones((3, 3, 32, 32))).compile().as_text()
print("ynn" if "__ynn_fusion" in hlo else "xla", os.environ.get("XLA_FLAGS"))
"""


def _probe(**env):
  env = {**{k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", xla_flags.OPT_OUT_ENV)}, **env}
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  return out.stdout.split()[0], out.stdout.split(" ", 1)[1].strip()


def test_import_jaxsd_moves_cpu_convolutions_off_ynnpack():
  kind, flags = _probe()
  assert kind == "xla"
  assert xla_flags.FAST_CPU_FLAGS[0] in flags


def test_opt_out_and_the_users_own_flag_win():
  assert _probe(**{xla_flags.OPT_OUT_ENV: "1"})[0] == "ynn"
  mine = f"{xla_flags.YNN_FUSION_FLAG}=individual_dot,individual_convolution"
  assert _probe(XLA_FLAGS=mine) == ("ynn", mine)


def test_with_flag_keeps_other_flags_and_an_existing_value():
  flag = "--xla_foo=1"
  assert xla_flags.with_flag("", flag) == flag
  assert xla_flags.with_flag("--xla_bar=2", flag) == "--xla_bar=2 --xla_foo=1"
  assert xla_flags.with_flag("--xla_foo=7", flag) == "--xla_foo=7"


def test_without_flag_drops_that_name_alone():
  assert xla_flags.without_flag("--xla_bar=2 --xla_foo=7 --xla_foo_x=3",
                                "--xla_foo=1") == "--xla_bar=2 --xla_foo_x=3"
  assert xla_flags.without_flag("--xla_foo", "--xla_foo") == ""
  assert xla_flags.without_flag("", "--xla_foo=1") == ""


def test_too_late_once_jax_runs_says_so(monkeypatch, caplog):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # backends started: XLA_FLAGS were read already
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.delenv(xla_flags.OPT_OUT_ENV, raising=False)
  assert not xla_flags.use_fast_cpu_kernels()
  assert os.environ["XLA_FLAGS"] == ""
  assert "JAX started before" in caplog.text
