"""jaxsd-export deletes nothing it did not write (issue 25).

`--out` that is, holds or sits inside a jaxsd run, holds one of the run's
inputs, or holds anything but a previous export is refused with a one-line
error, --overwrite or not, and left as it was; --overwrite replaces only a
previous export. Folders are made by hand: nothing here trains.
"""
import os

import ml_collections
import pytest

from jaxsd import errors
from jaxsd.interop import export
from jaxsd.interop import lora_format
from jaxsd.interop import sd_pipeline


def _files(root) -> dict:
  """{relative path: bytes} of every file below root."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _write(path, text="x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _run(folder):
  """A jaxsd run as a workdir holds it: checkpoints, config.json, a lock."""
  _write(os.path.join(folder, "checkpoints", "10", "state"), "weights")
  _write(os.path.join(folder, "config.json"), "{}")
  _write(os.path.join(folder, "train.lock"), "")
  return str(folder)


def _pipeline_export(folder):
  """What a previous pipeline export left: model_index.json and the parts."""
  _write(os.path.join(folder, sd_pipeline.MODEL_INDEX), "{}")
  for part in sd_pipeline.PARTS:
    _write(os.path.join(folder, part, "config.json"), "{}")
  return str(folder)


def _lora_export(folder):
  _write(os.path.join(folder, lora_format.WEIGHT_NAME), "tensors")
  return str(folder)


def _refused(out, match, **kwargs):
  """check_out(out) raises ConfigError matching `match`, one line, and
  out's files are unchanged."""
  before = _files(out) if os.path.isdir(out) else None
  for overwrite in (False, True):
    with pytest.raises(errors.ConfigError, match=match) as info:
      export.check_out(out, overwrite=overwrite, **kwargs)
    assert "\n" not in str(info.value)
  if before is not None:
    assert _files(out) == before


def test_the_runs_own_workdir_is_refused_and_kept(tmp_path):
  workdir = _run(tmp_path / "run")
  before = _files(workdir)
  # The call of issue 25: --out=WORKDIR --overwrite, through export() itself.
  with pytest.raises(errors.ConfigError, match="is a jaxsd run"):
    export.export(workdir, workdir, overwrite=True)
  assert _files(workdir) == before
  _refused(workdir, "is a jaxsd run", workdir=workdir)


@pytest.mark.parametrize("marker", ["checkpoints", "config.json",
                                    "train.lock", "autoencoder.json"])
def test_each_run_marker_makes_a_folder_a_run(tmp_path, marker):
  out = tmp_path / "out"
  if marker == "checkpoints":
    os.makedirs(out / marker)
  else:
    _write(str(out / marker))
  assert export.is_run(str(out))
  _refused(str(out), "is a jaxsd run")


def test_a_folder_inside_a_run_is_refused(tmp_path):
  workdir = _run(tmp_path / "run")
  _refused(os.path.join(workdir, "exported"), f"inside the jaxsd run "
           f"{workdir}")
  # Also where the folder is a previous export.
  inside = _pipeline_export(os.path.join(workdir, "eval", "exported"))
  _refused(inside, "inside the jaxsd run")


def test_a_folder_holding_the_run_is_refused(tmp_path):
  workdir = _run(tmp_path / "deep" / "er" / "run")
  _refused(str(tmp_path), "holds the run being exported", workdir=workdir)
  # Another run, not the one exported, named in the error.
  _refused(str(tmp_path / "deep"), "holds the jaxsd run")


def test_other_files_are_refused_with_or_without_overwrite(tmp_path):
  out = tmp_path / "out"
  _write(str(out / "notes.txt"), "mine")
  _refused(str(out), r"not a jaxsd export \(notes.txt\)")
  # A pipeline folder with files no export writes (a downloaded base).
  base = _pipeline_export(tmp_path / "base")
  _write(os.path.join(base, "safety_checker", "config.json"))
  _refused(base, "safety_checker")
  # The LoRA weights beside other files.
  mixed = _lora_export(tmp_path / "mixed")
  _write(os.path.join(mixed, "README.md"))
  _refused(mixed, "README.md")


def test_a_file_or_a_link_is_refused(tmp_path):
  _write(str(tmp_path / "file"))
  _refused(str(tmp_path / "file"), "is a file")
  target = _pipeline_export(tmp_path / "target")
  os.symlink(target, tmp_path / "link")
  _refused(str(tmp_path / "link"), "symbolic link")


def test_the_runs_inputs_are_refused(tmp_path):
  # A base pipeline shaped exactly like an export: only the config tells.
  base = _pipeline_export(tmp_path / "base")
  config = ml_collections.ConfigDict({
      "model": {"pretrained_pipeline": base, "pretrained": "",
                "autoencoder": os.path.join(base, "vae")},
      "text": {"pretrained": "openai/clip-vit-large-patch14",
               "tokenizer": ""}})
  _refused(base, "model.pretrained_pipeline", config=config)
  _refused(os.path.join(base, "vae"), "model.autoencoder", config=config)
  assert export.check_out(base, overwrite=True) == "pipeline"  # no config


def test_a_previous_export_needs_overwrite(tmp_path):
  for kind, make in (("pipeline", _pipeline_export), ("lora", _lora_export)):
    out = make(tmp_path / kind)
    before = _files(out)
    with pytest.raises(errors.OutputExistsError, match="--overwrite") as info:
      export.check_out(out)
    assert isinstance(info.value, FileExistsError)
    assert export.check_out(out, overwrite=True) == kind
    assert _files(out) == before  # checking writes nothing


def test_a_new_or_empty_folder_is_written(tmp_path):
  assert export.check_out(str(tmp_path / "new" / "out")) is None
  os.makedirs(tmp_path / "empty")
  assert export.check_out(str(tmp_path / "empty")) is None
