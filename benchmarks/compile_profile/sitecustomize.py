"""Records every JAX trace, lowering and compile of a process tree.

With this folder on PYTHONPATH and JAXSD_COMPILE_PROFILE=FILE, every Python
process that imports jax (pytest's workers and the commands and workers the
tests start, which inherit both variables) appends one line per event to
FILE: time, pid, the pytest test running (PYTEST_CURRENT_TEST, inherited by
subprocesses), event, seconds, argv. Events: jax.monitoring's
/jax/core/compile/{jaxpr_trace,jaxpr_to_mlir_module,backend_compile}_duration
(backend_compile includes a persistent-cache read) and
/jax/compilation_cache/{cache_retrieval_time_sec,compile_time_saved_sec}.
Summary: python benchmarks/compile_profile.py FILE.

A sitecustomize module, so that it needs no change to jaxsd or the tests;
it registers its listener when jax is first imported and imports nothing
else before that.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import time

_OUT = os.environ.get("JAXSD_COMPILE_PROFILE")
_PREFIXES = ("/jax/core/compile/", "/jax/compilation_cache/")


def _register():
  from jax import monitoring  # pylint: disable=g-import-not-at-top

  def listener(event, duration, **unused_kwargs):
    if not event.startswith(_PREFIXES):
      return
    test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
    argv = " ".join(sys.argv)[:120].replace("\t", " ")
    with open(_OUT, "a") as f:  # one short write per line: safe to share
      f.write(f"{time.time():.2f}\t{os.getpid()}\t{test}\t"
              f"{event.rsplit('/', 1)[1]}\t{duration:.3f}\t{argv}\n")
  monitoring.register_event_duration_secs_listener(listener)


class _AfterJaxImport(importlib.abc.MetaPathFinder):
  """Finds `jax` as usual and registers the listener once it has loaded."""

  def find_spec(self, name, path, target=None):
    if name != "jax":
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      try:
        _register()
      except Exception as e:  # pylint: disable=broad-except
        sys.stderr.write(f"compile_profile: no listener ({e})\n")
    spec.loader.exec_module = exec_and_register
    return spec


if _OUT:
  sys.meta_path.insert(0, _AfterJaxImport())
