"""Faults that end a command in one line: `jaxsd: error: ...`, exit 1.

Each test is a probe of issue 25 and the line it must print (or the
JaxsdError the library raises, which `cli.run` prints as that line): a
missing --config file, every image-folder problem, undecodable images, a
refused pickle, a read-only workdir, jaxsd-sample without --prompt,
jaxsd-evaluate over a damaged checkpoint, an evaluation none of whose
metrics can run. Commands run in-process (cli.run with sys.argv set).
"""
import errno
import json
import logging
import os
import pickle
import zipfile

from absl import logging as absl_logging  # noqa: F401 (defines its flags)
import numpy as np
import pytest
from PIL import Image

from jaxsd import errors

import helpers

ROOT = helpers.ROOT  # the repository


@pytest.mark.parametrize("module_name,extra", [
    ("jaxsd.commands.train", ["--workdir=unused"]),
    ("jaxsd.commands.train_autoencoder", ["--workdir=unused"]),
    ("jaxsd.commands.cache", ["--out=unused"]),
])
@pytest.mark.parametrize("config_args", [
    ["--config=configs/nope.py"],
    ["--config", "configs/nope.py:variant", "--config.training.num_steps=3"],
])
def test_missing_config_file_is_one_line(module_name, extra, config_args,
                                         fresh_flags, monkeypatch, capsys,
                                         tmp_path):
  del fresh_flags
  monkeypatch.chdir(ROOT)
  code, _, err = helpers.run_command(module_name, config_args + extra, monkeypatch,
                              capsys)
  assert code == 1
  line = helpers.one_line(err)
  assert "the config file 'configs/nope.py' does not exist" in line
  assert "e.g. --config=configs/mnist.py" in line
  assert not os.path.exists(os.path.join(ROOT, "unused"))


def _png(path, value=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (8, 8), (value, 40, 200)).save(path)


def _metadata(folder, rows):
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _imagefolder_source(path):
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxsd.data import sources  # pylint: disable=g-import-not-at-top
  data = default.get_config().data
  data.source, data.path = "imagefolder", str(path)
  return sources.make_source(data)


def test_imagefolder_empty_folder(tmp_path):
  with pytest.raises(errors.DataError,
                     match=r"holds no images .*point data\.path at"):
    _imagefolder_source(tmp_path)


def test_imagefolder_row_whose_file_is_missing(tmp_path):
  _png(str(tmp_path / "a.png"))
  _metadata(tmp_path, [{"file_name": "a.png", "text": "a"},
                       {"file_name": "gone.png", "text": "gone"}])
  with pytest.raises(errors.DataError, match=r"line 2 names 'gone\.png', "
                     r"which is not an image .*fix the file_name or add"):
    _imagefolder_source(tmp_path)


def test_imagefolder_row_without_text_asks_for_its_caption(tmp_path):
  _png(str(tmp_path / "a.png"))
  _png(str(tmp_path / "b.png"))
  _metadata(tmp_path, [{"file_name": "a.png", "text": "a"},
                       {"file_name": "b.png"}])
  with pytest.raises(errors.DataError) as e:
    _imagefolder_source(tmp_path)
  assert "line 2 ('b.png') has no 'text' caption" in str(e.value)
  assert "give every row its caption in 'text'" in str(e.value)
  # The column exists: data.caption_key is not the fix.
  assert "caption_key" not in str(e.value)


def test_imagefolder_without_the_caption_column_names_caption_key(tmp_path):
  _png(str(tmp_path / "a.png"))
  _metadata(tmp_path, [{"file_name": "a.png", "caption": "a"}])
  with pytest.raises(errors.DataError, match=r"no row has one.*set "
                     r"data\.caption_key to the column"):
    _imagefolder_source(tmp_path)


def test_imagefolder_image_without_a_row(tmp_path):
  _png(str(tmp_path / "a.png"))
  _png(str(tmp_path / "extra.png"))
  _metadata(tmp_path, [{"file_name": "a.png", "text": "a"}])
  with pytest.raises(errors.DataError, match=r"1 of 2 images .*'extra\.png' "
                     r"\(no row in metadata\.jsonl\); add a row for each"):
    _imagefolder_source(tmp_path)


def test_imagefolder_problem_ends_jaxsd_train_in_one_line(
    fresh_flags, monkeypatch, capsys, tmp_path):
  """Through the command: the image folder's error is its one line, and the
  start leaves nothing in the new workdir."""
  del fresh_flags
  monkeypatch.chdir(ROOT)
  (tmp_path / "images").mkdir()
  workdir = tmp_path / "run"
  code, _, err = helpers.run_command("jaxsd.commands.train", [
      "--config=configs/tiny.py", "--config.data.source=imagefolder",
      f"--config.data.path={tmp_path / 'images'}",
      "--config.eval.metrics=()",
      f"--workdir={workdir}"], monkeypatch, capsys)
  assert code == 1
  assert "holds no images" in helpers.one_line(err)
  assert not workdir.exists()


class _Skips:
  """A loader stand-in whose statistics name one bad file twice (as a state
  saved before the loader kept its keys distinct may)."""

  def statistics(self):
    return {"skipped": 3, "skipped_fraction": 0.3,
            "skipped_keys": ["bad.png", "bad.png", "worse.png"]}


def test_too_many_undecodable_images_is_one_line_naming_each_file_once():
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.JaxsdError) as e:
    pipeline.check_skipped(_Skips(), 0.01)
  assert isinstance(e.value, pipeline.TooManySkippedImagesError)
  assert "the first: bad.png, worse.png. Fix or remove" in str(e.value)


def test_loader_keeps_each_undecodable_file_once_over_epochs(tmp_path):
  from jaxsd.data import loader as loader_lib  # pylint: disable=g-import-not-at-top
  from jaxsd.data import source_imagefolder  # pylint: disable=g-import-not-at-top
  files = [f"{i}.png" for i in range(4)]
  for i, name in enumerate(files):
    _png(str(tmp_path / name), i)
  with open(tmp_path / "1.png", "r+b") as f:
    f.truncate(20)
  source = source_imagefolder.ImageFolderSource(str(tmp_path), files,
                                                files)
  loader = loader_lib.make_loader(
      source, global_batch_size=2, image_size=8, seed=0,
      tokenize_fn=lambda captions: np.zeros((len(captions), 4), np.int32))
  for _ in range(6):  # three epochs: 1.png is met three times
    loader.next_batch()
  stats = loader.statistics()
  assert stats["skipped"] >= 2
  assert stats["skipped_keys"] == ["1.png"]


class _RunsShell:
  def __init__(self, sentinel):
    self.sentinel = str(sentinel)

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


def test_refused_pickle_is_one_line_naming_the_file(tmp_path):
  from jaxsd.models import torch_checkpoint  # pylint: disable=g-import-not-at-top
  sentinel = tmp_path / "ran"
  path = tmp_path / "pytorch_model.bin"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(
        {"w": _RunsShell(sentinel)}, protocol=2))
  with pytest.raises(errors.JaxsdError) as e:
    torch_checkpoint.load_state_dict(str(path))
  assert isinstance(e.value, pickle.UnpicklingError)
  assert str(e.value).startswith(f"{path}: refusing to unpickle ")
  assert "Nothing of it was run" in str(e.value)
  assert not sentinel.exists()


def _read_only(monkeypatch, folder):
  """Writes under `folder` fail as on a read-only mount (chmod does not stop
  root, which the tests may run as)."""
  folder = os.path.abspath(folder)
  real_open, real_makedirs = os.open, os.makedirs

  def refused(path):
    return os.path.abspath(path).startswith(folder + os.sep)

  def fake_open(path, flags_, *args, **kwargs):
    if refused(path) and flags_ & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_open(path, flags_, *args, **kwargs)

  def fake_makedirs(path, *args, **kwargs):
    if refused(os.path.join(path, "x")) and not os.path.isdir(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_makedirs(path, *args, **kwargs)
  monkeypatch.setattr(os, "open", fake_open)
  monkeypatch.setattr(os, "makedirs", fake_makedirs)


def test_read_only_workdir_lock_is_one_line(tmp_path, monkeypatch):
  from jaxsd import workdir_lock as lock_lib  # pylint: disable=g-import-not-at-top
  _read_only(monkeypatch, tmp_path)
  with pytest.raises(errors.NotWritableError) as e:
    lock_lib.Lock(tmp_path).acquire()
  assert str(e.value).startswith(
      f"Cannot write the workdir {tmp_path} (Read-only file system: "
      f"creating {tmp_path / 'train.lock'})")
  assert "train in another --workdir" in str(e.value)


@pytest.mark.mnist  # configs/tiny.py trains on MNIST, checked before the workdir
def test_read_only_workdir_jaxsd_train_is_one_line(
    fresh_flags, monkeypatch, capsys, tmp_path):
  del fresh_flags
  monkeypatch.chdir(ROOT)
  workdir = tmp_path / "run"
  workdir.mkdir()
  _read_only(monkeypatch, workdir)
  code, _, err = helpers.run_command("jaxsd.commands.train", [
      "--config=configs/tiny.py", f"--workdir={workdir}"], monkeypatch,
                              capsys)
  assert code == 1
  assert f"Cannot write the workdir {workdir}" in helpers.one_line(err)


def test_read_only_workdir_jaxsd_evaluate_prints_results_then_one_line(
    fresh_flags, monkeypatch, capsys, tmp_path):
  """The metrics are printed as each checkpoint is scored; the tables that
  cannot be written end the command in one line naming the folder."""
  del fresh_flags
  from jaxsd.evaluation import checkpoints  # pylint: disable=g-import-not-at-top
  scored = [{"step": 2, "prompt_accuracy": 0.5},
            {"step": 4, "prompt_accuracy": 0.75}]

  def evaluated(workdir, steps, on_result=None, **kwargs):
    del workdir, steps, kwargs
    for result in scored:
      on_result(result)
    return scored
  monkeypatch.setattr(checkpoints, "evaluate_checkpoints", evaluated)
  _read_only(monkeypatch, tmp_path)
  code, out, err = helpers.run_command("jaxsd.commands.evaluate", [
      f"--workdir={tmp_path}", "--nomlflow"], monkeypatch, capsys)
  assert code == 1
  assert [json.loads(line) for line in out.splitlines()] == scored
  line = helpers.one_line(err)
  assert f"Cannot write the evaluation tables to {tmp_path / 'eval'}" in line
  assert "the results above were not saved" in line


def _unrunnable_eval_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.metrics = ("fid_inception", "clip_score")
  config.eval.inception_weights = "/nonexistent/pt_inception.pth"
  config.eval.clip_model = "/nonexistent/clip"
  return config


def test_evaluation_that_can_score_nothing_is_off_said_once(caplog):
  from jaxsd.diffusion import task  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  evaluator = evaluator_lib.Evaluator(_unrunnable_eval_config())
  with caplog.at_level(logging.INFO):
    assert task.prepare_evaluator(evaluator) is None
  off = [r.getMessage() for r in caplog.records
         if "evaluation is off" in r.getMessage()]
  assert len(off) == 1
  assert off[0].startswith("None of eval.metrics ['fid_inception', "
                           "'clip_score'] can run on this machine "
                           "(fid_inception: no FID Inception weights")
  assert "clip_score: CLIP model '/nonexistent/clip' unavailable" in off[0]


def test_evaluation_generates_with_progress_only_when_a_metric_runs():
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.metrics = ("diversity",)
  evaluator = evaluator_lib.Evaluator(config)
  calls = []

  def generate_fn(params, prompts, rng, progress):
    del params, rng
    calls.append(progress)
    return np.zeros((len(prompts), 28, 28, 1), np.float32)
  # Stands in for the classifier: only what is generated matters here.
  evaluator.evaluate = lambda images, prompts: {"diversity": 0.0}
  out = evaluator_lib.evaluate_params(evaluator, generate_fn, None, None)
  assert out["diversity"] == 0.0
  assert len(calls) == 1 and isinstance(calls[0], generate.ProgressLog)


def test_generation_progress_line_has_count_rate_and_eta(caplog):
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  now = [0.0]
  progress = generate.ProgressLog("Evaluation", every_s=10.0,
                                  clock=lambda: now[0])
  with caplog.at_level(logging.INFO):
    now[0] = 5.0
    progress(64, 512)  # within 10 s of the start: quiet
    now[0] = 16.0
    progress(128, 512)
    now[0] = 20.0
    progress(192, 512)  # within 10 s of the last line: quiet
    now[0] = 64.0
    progress(512, 512)  # the end, after a line: always
  # ProgressLog's lines only: the first test of a worker process also
  # records JAX's backend start-up (jax.process_index initialises it).
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("Evaluation:")]
  assert lines == [
      "Evaluation: 128/512 images (25%), 8.00 images/s, ETA 0:00:48",
      "Evaluation: 512/512 images (100%), 8.00 images/s, done in 64 s"]
