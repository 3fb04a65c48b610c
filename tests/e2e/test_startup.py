"""What a command's start imports: jaxsd's runs leave TensorFlow and PyTorch
out unless they read a tfds dataset (TensorFlow took 9 s and PyTorch 2 s of
every start on a 2-core AMD EPYC, 2026-12-06)."""
import subprocess
import sys

import helpers

_PROBE = """
import os, sys
os.environ["USE_TORCH"] = "0"  # as jaxsd.commands.cli.run sets it
import ml_collections
from jaxsd.diffusion import task  # the trainer and its chores
from jaxsd.text import encoder
from jaxsd.tracking import writers
config = ml_collections.ConfigDict({"logging": {
    "mlflow": True, "experiment_name": "probe", "run_name": ""}})
writer, _ = writers.create_writers(config, sys.argv[1])
writer.write_scalars(1, {"train/loss": 1.0})
writer.close()
encoder.load_tokenizer(os.environ["JAXSD_CLIP_TOKENIZER"])
print(sorted(m for m in ("tensorflow", "torch") if m in sys.modules))
"""


def test_a_run_start_imports_neither_tensorflow_nor_torch(tmp_path):
  out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)],
                       cwd=helpers.ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
  assert list(tmp_path.glob("events.out.tfevents.*"))
