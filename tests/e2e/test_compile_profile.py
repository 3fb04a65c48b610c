"""benchmarks/compile_profile: the recorder sees a subprocess's compiles
under the test that started it, and the summary adds them up."""
import os
import subprocess
import sys

import helpers

PROFILE = os.path.join(helpers.ROOT, "benchmarks", "compile_profile")
sys.path.insert(0, os.path.join(helpers.ROOT, "benchmarks"))
import compile_profile  # pylint: disable=g-import-not-at-top,wrong-import-position

_TWO_PROGRAMS = """
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
jax.jit(lambda x: x @ x.T)(jnp.ones((4, 4))).block_until_ready()
"""


def test_records_a_subprocess_compiles_under_the_current_test(tmp_path,
                                                              capsys):
  out = tmp_path / "compiles.tsv"
  env = {**os.environ, "JAXSD_COMPILE_PROFILE": str(out),
         "PYTHONPATH": os.pathsep.join(
             p for p in (PROFILE, os.environ.get("PYTHONPATH")) if p),
         "JAX_COMPILATION_CACHE_DIR": ""}  # compiled, not read back
  subprocess.run([sys.executable, "-c", _TWO_PROGRAMS], env=env, check=True,
                 timeout=120)
  rows = compile_profile.read(str(out))
  this_test = os.environ["PYTEST_CURRENT_TEST"].split(" ")[0]
  compiles = [r for r in rows if r[1] == "backend_compile_duration"]
  assert len(compiles) >= 2 and all(r[0] == this_test for r in compiles)
  assert {r[1] for r in rows} >= set(compile_profile.JAX_TIME)
  assert all(r[2] >= 0 for r in rows)

  compile_profile.summarise(rows, top=5)
  printed = capsys.readouterr().out
  total = sum(r[2] for r in rows if r[1] in compile_profile.JAX_TIME)
  assert f"trace + lower + compile: {total:.1f} s" in printed
  assert this_test in printed
