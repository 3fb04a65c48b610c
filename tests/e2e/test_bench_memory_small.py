"""benchmarks/bench_memory.py at --size=small and bench_attention.py at a
small size, so the scripts cannot rot. bench_memory: jaxsd and PyTorch
each run one LoRA step in a fresh process and the summary compares them.
Without remat, to keep it short: remat under LoRA is tested in
tests/unit/test_unet.py, its speed and memory at SD size are
benchmarks/README.md's."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_bench_memory_small_runs_jaxsd_and_pytorch():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"),
       "--size=small", "--mode=lora", "--remat=none", "--steps=1",
       "--resolution=32"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=1500)
  assert out.returncode == 0, out.stderr[-3000:]
  results = [json.loads(line) for line in out.stdout.splitlines()
             if line.startswith('{"') and '"machine"' not in line[:12]]
  by_framework = {r["framework"]: r for r in results}
  assert set(by_framework) == {"jaxsd", "pytorch"}, out.stdout[-3000:]
  for r in results:
    assert "failed" not in r and "skipped" not in r, r
    assert r["step_s"] > 0 and r["peak_rss_bytes"] > 0
    assert all(l == l for l in r["losses"])  # finite-ish: not NaN
  # The same architecture and adapters on both sides.
  assert by_framework["jaxsd"]["params"] == by_framework["pytorch"]["params"]
  assert (by_framework["jaxsd"]["trained_params"] ==
          by_framework["pytorch"]["trained_params"])
  assert by_framework["jaxsd"]["xla"]["temp_bytes"] > 0
  assert "jaxsd / PyTorch peak RSS" in out.stdout


def test_bench_attention_prints_each_path_and_pytorch():
  """benchmarks/bench_attention.py at a small size: every path it times
  (flash_blocks' choice, XLA's, given blocks) and PyTorch's SDPA."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"),
       "--sizes=256x2x8", "--blocks=auto,xla,64x128", "--repeats=1"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split("|")[2].strip() for line in out.stdout.splitlines()
          if line.startswith("| 256x2x8 |")]
  assert rows == ["jaxsd blocked 256x256 (auto)", "jaxsd xla, unblocked",
                  "jaxsd blocked 64x128", "PyTorch SDPA"], out.stdout
