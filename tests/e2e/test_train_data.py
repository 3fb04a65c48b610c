"""End to end beyond MNIST: a tiny RGB model trains on an image folder and on
webdataset shards the test writes, checkpoints, logs its data, writes a
sample grid of the data's own captions, and a run stopped by SIGTERM and
resumed ends with the uninterrupted run's parameters (the loader's position
is in the checkpoint)."""
import io
import json
import os
import signal
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.tracking import mlflow_store
from jaxsd.training import trainer as train
from jaxsd.data import pipeline as data_pipeline

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _picture(i: int) -> Image.Image:
  """A 20x24 picture: a coloured square on noise."""
  name = list(COLOURS)[i % 3]
  rng = np.random.default_rng(i)
  pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
  pixels[4:14, 6:16] = COLOURS[name]
  return Image.fromarray(pixels)


def _caption(i: int) -> str:
  return f"a {list(COLOURS)[i % 3]} square"


def _imagefolder(path, count=24) -> str:
  os.makedirs(path)
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i in range(count):
      _picture(i).save(os.path.join(path, f"{i:03d}.png"))
      f.write(json.dumps({"file_name": f"{i:03d}.png",
                          "text": _caption(i)}) + "\n")
  return path


def _webdataset(path, shards=3, per_shard=8) -> str:
  os.makedirs(path)
  for s in range(shards):
    with tarfile.open(os.path.join(path, f"{s:05d}.tar"), "w") as tar:
      for j in range(per_shard):
        i = s * per_shard + j
        buffer = io.BytesIO()
        _picture(i).save(buffer, format="JPEG")
        for suffix, data in (("jpg", buffer.getvalue()),
                             ("txt", _caption(i).encode())):
          info = tarfile.TarInfo(f"{i:06d}.{suffix}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(path, "{00000..00002}.tar")


def _config(tiny_config, source, path):
  config = tiny_config()
  config.data.source = source
  config.data.path = path
  config.data.image_size = 16
  config.data.num_channels = 3
  config.data.crop = "random"
  config.data.random_flip = True
  config.data.shuffle_buffer = 10
  config.model.in_channels = config.model.out_channels = 3
  config.text.max_length = 8
  config.eval.metrics = ()  # the MNIST metrics judge digits only
  config.sampling.prompts = ()  # the data's own captions
  return config


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.ema_params))]


def _run(config, workdir, monkeypatch=None, sigterm_at=None):
  if sigterm_at is not None:
    reached = train._Preemption.reached  # pylint: disable=protected-access

    def patched(self, step):
      if step == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return reached(self, step)
    monkeypatch.setattr(train._Preemption, "reached", patched)  # pylint: disable=protected-access
  return train.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_trains_checkpoints_and_resumes_exactly(source, tiny_config, tmp_path,
                                                monkeypatch):
  path = (_imagefolder(str(tmp_path / "images")) if source == "imagefolder"
          else _webdataset(str(tmp_path / "shards")))
  whole = _run(_config(tiny_config, source, path), tmp_path / "whole")
  assert int(whole.step) == 4
  workdir = tmp_path / "whole"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert (workdir / "samples" / "step_00000004.png").exists()
  grid = Image.open(workdir / "samples" / "step_00000004.png")
  assert grid.size[0] >= 3 * 16  # one column per distinct caption

  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  (run,) = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  key = "data/examples" if source == "imagefolder" else "data/shards"
  assert run.data.metrics[key] == (24 if source == "imagefolder" else 3)
  assert [a.path for a in client.list_artifacts(run.info.run_id, "data")] == [
      "data/examples"]

  if source == "imagefolder":
    return  # random-access resumes are exact for MNIST (test_train_e2e.py)
  stopped = _run(_config(tiny_config, source, path), tmp_path / "resumed",
                 monkeypatch, sigterm_at=2)
  assert int(stopped.step) == 2
  monkeypatch.undo()
  resumed = _run(_config(tiny_config, source, path), tmp_path / "resumed")
  assert int(resumed.step) == 4
  for a, b in zip(_leaves(resumed), _leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_undecodable_images_are_counted_then_stop_the_run(tiny_config,
                                                          tmp_path):
  path = _imagefolder(str(tmp_path / "images"))
  for i in (3, 11):  # 2 of 24 images truncated
    with open(os.path.join(path, f"{i:03d}.png"), "r+b") as f:
      f.truncate(40)
  config = _config(tiny_config, "imagefolder", path)
  config.data.max_skipped_fraction = 0.5
  train.train_and_evaluate(config, str(tmp_path / "tolerated"))
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(
      tracking_uri=mlflow_store.tracking_uri(tmp_path / "tolerated"))
  (run,) = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  assert run.data.metrics["data/skipped"] >= 1

  config = _config(tiny_config, "imagefolder", path)
  config.data.max_skipped_fraction = 0.01
  with pytest.raises(data_pipeline.TooManySkippedImagesError,
                     match=r"(003|011)\.png"):
    train.train_and_evaluate(config, str(tmp_path / "stopped"))
