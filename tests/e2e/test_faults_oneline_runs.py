"""Faults that end in one line, on a trained run: jaxsd-sample's default
prompts, jaxsd-evaluate over a damaged checkpoint and with no runnable
metric. The rest: tests/unit/test_faults_oneline.py."""
import logging
import os
import shutil

from absl import logging as absl_logging  # noqa: F401 (defines its flags)
import pytest


import helpers

ROOT = helpers.ROOT  # the repository


def _copy_run(trained_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[0], workdir)
  return workdir


def _truncate_array_data(step_dir):
  """Halves the array data files of a checkpoint's state."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(
      os.path.join(step_dir, "state")) for f in fs]
  for data in (f for f in files if os.sep + "d" + os.sep in f):
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)


@pytest.mark.mnist
def test_jaxsd_sample_without_prompt_uses_the_runs_grid_prompts(
    trained_run, fresh_flags, monkeypatch, capsys, tmp_path, caplog):
  del fresh_flags
  out = tmp_path / "grid.png"
  with caplog.at_level(logging.INFO):
    code, stdout, _ = helpers.run_command("jaxsd.commands.sample", [
        f"--workdir={trained_run[0]}", "--num_samples=1", "--steps=2",
        f"--out={out}"], monkeypatch, capsys)
  assert code == 0
  from configs import tiny  # pylint: disable=g-import-not-at-top
  prompts = list(tiny.get_config().sampling.prompts)
  assert f"Wrote {out} ({len(prompts)} prompts x 1" in stdout
  said = [r.getMessage() for r in caplog.records
          if r.getMessage().startswith("No --prompt")]
  assert said == [f"No --prompt: sampling the run's own grid prompts (its "
                  f"sampling.prompts): {prompts}"]


@pytest.mark.mnist
def test_evaluate_all_checkpoints_skips_a_damaged_one(trained_run, tmp_path,
                                                      caplog):
  from jaxsd.evaluation import checkpoints  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  _truncate_array_data(os.path.join(workdir, "checkpoints", "2"))
  with caplog.at_level(logging.INFO):
    results = checkpoints.evaluate_run(
        workdir, all_checkpoints=True, mlflow=False, num_samples=10,
        metrics=["prompt_accuracy"], sampler_steps=2)
  assert [r["step"] for r in results] == [4]
  warned = [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING]
  assert any(m.startswith("Skipping checkpoint step 2, which cannot be "
                          "read") for m in warned), warned
  with open(os.path.join(workdir, "eval", "checkpoints.csv")) as f:
    assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["4"]


@pytest.mark.mnist
def test_jaxsd_evaluate_with_no_runnable_metric_is_one_line(
    trained_run, fresh_flags, monkeypatch, capsys):
  del fresh_flags
  code, out, err = helpers.run_command("jaxsd.commands.evaluate", [
      f"--workdir={trained_run[0]}", "--metrics=clip_score",
      "--nomlflow"], monkeypatch, capsys)
  assert code == 1 and not out
  line = helpers.one_line(err)
  assert "None of eval.metrics ['clip_score'] can run" in line
  assert "choose others with --metrics" in line
