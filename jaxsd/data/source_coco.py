"""The `coco` source: COCO captions (`captions_train2017.json` + images).

`data.captions_file` is the annotations file ({"images": [{"id",
"file_name"}], "annotations": [{"image_id", "caption"}]}) and `data.path`
the folder of its images. Images are in increasing id order, each image's
captions in increasing annotation id order (surrounding whitespace
stripped); images without a caption are left out (logged).

`data.coco_captions`:
- "random": one example per image. `source[i]` has the image's first
  caption; `source.example(i, epoch)`, which the loader calls, draws one of
  its captions from `np.random.default_rng([epoch, i])` (the same draw in
  every process and after a resume, a new one each epoch).
- "all": every (image, caption) pair is its own example, image by image.
"""
import json
import os
from typing import Any, Dict, List, Sequence

from absl import logging
import numpy as np

from jaxsd.data import sources

CAPTION_MODES = ("random", "all")


def _load_annotations(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"data.captions_file={path!r} is not JSON ({e}).") from None
  lacking = [k for k in ("images", "annotations")
             if not isinstance(data, dict) or k not in data]
  if lacking:
    raise ValueError(f"data.captions_file={path!r} lacks {lacking}; it should "
                     "be a COCO captions file such as captions_train2017.json.")
  return data


@sources.register_source("coco")
class CocoSource(sources.RandomAccessSource):
  """Images `files[k]` under `root`, with captions
  `captions[offsets[k]:offsets[k + 1]]` (a flat list: small to pickle)."""

  def __init__(self, root: str, files: Sequence[str],
               captions_per_image: Sequence[Sequence[str]], mode: str):
    if mode not in CAPTION_MODES:
      raise ValueError(f"data.coco_captions={mode!r}; use one of "
                       f"{list(CAPTION_MODES)}.")
    self.root = root
    self.files = list(files)
    self.mode = mode
    self.captions: List[str] = [c for cs in captions_per_image for c in cs]
    counts = np.array([len(cs) for cs in captions_per_image], np.int64)
    if counts.size and counts.min() == 0:
      raise ValueError("every image needs at least one caption")
    self.offsets = np.concatenate([[0], np.cumsum(counts)])

  @classmethod
  def from_config(cls, data_config, split: str) -> "CocoSource":
    del split  # the captions file is the split
    mode = sources.config_field(data_config, "coco_captions") or "random"
    if mode not in CAPTION_MODES:
      raise ValueError(f"data.coco_captions={mode!r}; use one of "
                       f"{list(CAPTION_MODES)}.")
    path = sources.require_path(
        data_config, "captions_file",
        "the COCO captions file (captions_train2017.json)", directory=False)
    root = sources.require_path(
        data_config, "path", "the folder of the COCO images (train2017/)")
    data = _load_annotations(path)
    files = {}
    for image in data["images"]:
      files[image["id"]] = image["file_name"]
    by_image: Dict[Any, List[Any]] = {}
    orphans = 0
    for number, ann in enumerate(data["annotations"]):
      if ann.get("image_id") not in files or ann.get("caption") is None:
        orphans += 1
        continue
      by_image.setdefault(ann["image_id"], []).append(
          (ann.get("id", number), str(ann["caption"]).strip()))
    ids = sorted(files)
    uncaptioned = sum(1 for i in ids if i not in by_image)
    ids = [i for i in ids if i in by_image]
    if not ids:
      raise ValueError(f"data.captions_file={path!r} has no captioned images "
                       "(no annotation's image_id matches an image id).")
    if uncaptioned or orphans:
      logging.info("coco: %d images without captions left out; %d "
                   "annotations without an image ignored.", uncaptioned,
                   orphans)
    names = [files[i] for i in ids]
    cls._check_files(root, names, path)
    captions = [[c for _, c in sorted(by_image[i], key=lambda a: a[0])]
                for i in ids]
    return cls(root, names, captions, mode)

  @staticmethod
  def _check_files(root: str, names: Sequence[str], captions_file: str):
    listed = set(os.listdir(root))  # one listing, not 118k stats
    missing = [n for n in names
               if n not in listed and not os.path.isfile(os.path.join(root, n))]
    if missing:
      raise ValueError(
          f"{len(missing)} of the {len(names)} images of data.captions_file="
          f"{captions_file!r} are not in data.path={root!r}, e.g. "
          f"{missing[0]!r}; point data.path at the folder of these images.")

  def __len__(self) -> int:
    return len(self.captions) if self.mode == "all" else len(self.files)

  def _image_of(self, index: int) -> int:
    if self.mode == "all":  # index is a caption's; find its image
      return int(np.searchsorted(self.offsets, index, side="right")) - 1
    return index

  def _example(self, image: int, caption: int) -> sources.Example:
    name = self.files[image]
    key = name if self.mode == "random" else (
        f"{name}#{caption - self.offsets[image]}")
    return {"image": sources.read_bytes(os.path.join(self.root, name), name),
            "caption": self.captions[caption], "key": key}

  def __getitem__(self, index: int) -> sources.Example:
    index = self._check_index(index)
    if self.mode == "all":
      return self._example(self._image_of(index), index)
    return self._example(index, int(self.offsets[index]))

  def example(self, index: int, epoch: int) -> sources.Example:
    """In "random" mode, the image's caption drawn from (epoch, index)."""
    index = self._check_index(index)
    if self.mode == "all":
      return self[index]
    return self._example(index, self._drawn_caption(index, epoch))

  def _drawn_caption(self, index: int, epoch: int) -> int:
    lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
    if hi - lo == 1:
      return lo
    return lo + int(np.random.default_rng([epoch, index]).integers(hi - lo))

  def caption(self, index: int) -> str:
    if self.mode == "all":
      return self.captions[index]
    return self.captions[int(self.offsets[index])]

  def statistics(self):
    per_image = np.diff(self.offsets)
    return {**super().statistics(), "images": len(self.files),
            "captions": len(self.captions),
            "captions_per_image_min": int(per_image.min()),
            "captions_per_image_max": int(per_image.max())}
