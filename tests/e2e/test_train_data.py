"""End to end beyond MNIST: a tiny RGB model trains on an image folder and on
webdataset shards the test writes, checkpoints, logs its data, writes a
sample grid of the data's own captions, counts undecodable images (and stops
beyond data.max_skipped_fraction), and a run stopped by SIGTERM and resumed
ends with the uninterrupted run's parameters (the loader's position is in
the checkpoint)."""
import io
import os
import tarfile

import pytest
from PIL import Image

from jaxsd.data import pipeline as data_pipeline
from jaxsd.diffusion import task as diffusion_task

import helpers


def _webdataset(path, shards=3, per_shard=8) -> str:
  os.makedirs(path)
  for s in range(shards):
    with tarfile.open(os.path.join(path, f"{s:05d}.tar"), "w") as tar:
      for j in range(per_shard):
        i = s * per_shard + j
        buffer = io.BytesIO()
        helpers.picture(i).save(buffer, format="JPEG")
        for suffix, data in (("jpg", buffer.getvalue()),
                             ("txt", helpers.caption(i).encode())):
          info = tarfile.TarInfo(f"{i:06d}.{suffix}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(path, "{00000..00002}.tar")


def _config(tiny_config, source, path):
  config = helpers.rgb_data(tiny_config(), source, path)
  config.data.crop = "random"
  config.data.random_flip = True
  config.data.shuffle_buffer = 10
  return config


def _undecodable_imagefolder(path) -> str:
  """write_imagefolder's 24 pictures, 2 of them truncated."""
  path = helpers.write_imagefolder(path)
  for i in (3, 11):
    with open(os.path.join(path, f"{i:03d}.png"), "r+b") as f:
      f.truncate(40)
  return path


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_trains_checkpoints_and_resumes_exactly(source, tiny_config,
                                                tmp_path):
  # The image folder's run also tolerates undecodable images (counted in
  # data/skipped) up to data.max_skipped_fraction.
  path = (_undecodable_imagefolder(str(tmp_path / "images"))
          if source == "imagefolder" else _webdataset(str(tmp_path / "shards")))
  config = _config(tiny_config, source, path)
  if source == "imagefolder":
    config.data.max_skipped_fraction = 0.5
  whole = diffusion_task.train_and_evaluate(config, str(tmp_path / "whole"))
  assert int(whole.step) == 4
  workdir = tmp_path / "whole"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert (workdir / "samples" / "step_00000004.png").exists()
  grid = Image.open(workdir / "samples" / "step_00000004.png")
  assert grid.size[0] >= 3 * 16  # one column per distinct caption

  client, run = helpers.mlflow_run(workdir)
  key = "data/examples" if source == "imagefolder" else "data/shards"
  assert run.data.metrics[key] == (24 if source == "imagefolder" else 3)
  assert [a.path for a in client.list_artifacts(run.info.run_id, "data")] == [
      "data/examples"]

  if source == "imagefolder":
    assert run.data.metrics["data/skipped"] >= 1
    return  # random-access resumes are exact for MNIST (test_train_mnist.py)
  # Resumed from the step-2 checkpoint: the stream's state with it.
  resumed_dir = helpers.copy_run_until(str(workdir),
                                       str(tmp_path / "resumed"), 2)
  resumed = diffusion_task.train_and_evaluate(
      _config(tiny_config, source, path), resumed_dir)
  assert int(resumed.step) == 4
  helpers.assert_leaves_close(helpers.model_leaves(resumed),
                              helpers.model_leaves(whole))


def test_undecodable_images_beyond_the_limit_stop_the_run(tiny_config,
                                                         tmp_path):
  path = _undecodable_imagefolder(str(tmp_path / "images"))
  config = _config(tiny_config, "imagefolder", path)
  config.data.max_skipped_fraction = 0.01
  with pytest.raises(data_pipeline.TooManySkippedImagesError,
                     match=r"(003|011)\.png"):
    diffusion_task.train_and_evaluate(config, str(tmp_path / "stopped"))
