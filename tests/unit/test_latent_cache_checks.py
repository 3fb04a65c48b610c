"""A latent cache is refused for other data, not for the same folder
spelt another way (relative from another directory, a symlink)."""
import os

import ml_collections
import pytest

from jaxsd.data import latent_cache


def _info(data):
  return latent_cache.CacheInfo(
      examples=1, shards=[], latent_shape=[4, 4, 4], autoencoder="ae",
      autoencoder_fingerprint="f", data=latent_cache.data_fields(data))


def _data(path):
  return ml_collections.ConfigDict(dict(
      source="imagefolder", name="", split="train", path=path,
      captions_file="", caption_key="text", image_key="image",
      coco_captions="", num_channels=3, image_size=16, crop="center",
      caption_template=""))


def test_same_folder_spelt_another_way_is_accepted(tmp_path, monkeypatch):
  folder = tmp_path / "images"
  folder.mkdir()
  os.symlink(folder, tmp_path / "link")
  info = _info(_data(str(folder)))
  monkeypatch.chdir(tmp_path)
  for spelling in ("images", "./images/", str(tmp_path / "link")):
    latent_cache.check_matches(info, _data(spelling), "f", "cache")


def test_other_folder_or_size_is_refused(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  info = _info(_data(str(tmp_path / "a")))
  with pytest.raises(ValueError, match=r"other data: data.path was"):
    latent_cache.check_matches(info, _data(str(tmp_path / "b")), "f", "c")
  other = _data(str(tmp_path / "a"))
  other.image_size = 32
  with pytest.raises(ValueError, match=r"data.image_size was 16, is 32"):
    latent_cache.check_matches(info, other, "f", "c")
  with pytest.raises(ValueError, match="fingerprint"):
    latent_cache.check_matches(info, _data(str(tmp_path / "a")), "g", "c")
