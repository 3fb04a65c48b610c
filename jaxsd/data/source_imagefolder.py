"""The `imagefolder` source: a folder of images and their captions.

`data.path` is searched recursively for .jpg/.jpeg/.png/.webp files (hidden
files and folders skipped); examples are in sorted relative-path order. Each
image's caption comes from, in this order:

1. `metadata.jsonl` or `metadata.csv` in `data.path` (the Hugging Face
   imagefolder convention): a `file_name` column (relative to `data.path`)
   and a `text` column (`data.caption_key` names another);
2. a `.txt` file beside the image with the same stem (`cat.jpg`, `cat.txt`);
3. only when neither exists anywhere: class subfolders
   (`data.path/<class>/...`), captioned by `data.caption_template` with
   `{label_name}` (the folder's name) and `{label}` (its index among the
   sorted class folders).

An image left without a caption, a metadata row naming a missing image, or a
missing column is a `jaxsd.errors.DataError` (a ValueError) naming the file
and the fix. Captions are stripped of
surrounding whitespace. Examples carry the file's bytes, decoded later in
the loader.

The folder is one split, unless `data.holdout_fraction` > 0: then a fixed
share of its images is held out of training (`held_out`: by a hash of the
image's relative path, so the choice is the same on every machine and in
every run, and adding images does not move others across). Split "train"
(data.split) is the rest; any other split ("test", eval.reference_split's
default) is the held-out share, which validation loss, reconstruction
figures and FID references read.
"""
import csv
import json
import os
import zlib
from typing import Dict, List, Sequence, Tuple

from jaxsd.data import sources
from jaxsd.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
HOW_TO_CAPTION = (
    "Caption images in one of three ways: metadata.jsonl or metadata.csv in "
    "data.path with file_name and text columns (data.caption_key names "
    "another caption column); a .txt file with the same stem beside each "
    "image (cat.jpg + cat.txt); or class subfolders data.path/<class>/ with "
    "data.caption_template using {label_name} (folder name) / {label}")


def held_out(name: str, fraction: float) -> bool:
  """Whether the image at relative path `name` is in the held-out share
  (data.holdout_fraction): CRC-32 of the path, in millionths, below it."""
  return zlib.crc32(name.encode("utf-8")) % 1_000_000 < fraction * 1_000_000


def list_images(root: str) -> List[str]:
  """Relative posix paths of the images under `root`, sorted."""
  found = []
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    rel = os.path.relpath(folder, root)
    for f in files:
      if not f.startswith(".") and f.lower().endswith(
          sources.IMAGE_EXTENSIONS):
        found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
  return sorted(found)


def _normalise(file_name: str) -> str:
  name = file_name.replace("\\", "/")
  while name.startswith("./"):
    name = name[2:]
  return name


def _metadata_rows(path: str) -> List[Tuple[int, Dict[str, object]]]:
  """(line or row number, row) of a metadata.jsonl / metadata.csv file."""
  rows = []
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not JSON ({e}); each "
                             "line must be an object with file_name and the "
                             "caption column.") from None
          if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object; "
                            "each line must be an object with file_name and "
                            "the caption column.")
          rows.append((number, row))
  else:
    with open(path, encoding="utf-8", newline="") as f:
      # Row numbers count the header as row 1, as a spreadsheet does.
      rows = list(enumerate(csv.DictReader(f), 2))
  return rows


def _metadata_captions(root: str, images: Sequence[str], caption_key: str
                       ) -> Dict[str, str]:
  """{relative path: caption} from the folder's metadata file, if any."""
  present = [m for m in METADATA_FILES if os.path.isfile(os.path.join(root, m))]
  if not present:
    return {}
  if len(present) > 1:
    raise DataError(f"data.path={root!r} has both {present[0]} and "
                     f"{present[1]}; keep one metadata file.")
  path = os.path.join(root, present[0])
  column = caption_key or "text"
  known = set(images)
  captions = {}
  rows = _metadata_rows(path)
  # Whether any row has the caption column: if none does, the column has
  # another name (data.caption_key); if some do, the others lack a caption.
  column_exists = any(row.get(column) is not None for _, row in rows)
  for number, row in rows:
    where = f"{path} {'line' if path.endswith('.jsonl') else 'row'} {number}"
    if "file_name" not in row:
      raise DataError(f"{where} has no file_name column (columns: "
                       f"{sorted(row)}); name each image in file_name.")
    if column not in row or row[column] is None:
      if column_exists:
        raise DataError(
            f"{where} ({row['file_name']!r}) has no {column!r} caption, "
            f"though other rows have one; give every row its caption in "
            f"{column!r} (or remove the row and its image).")
      raise DataError(
          f"{where} has no {column!r} caption column (columns: "
          f"{sorted(row)}) and no row has one; name each image's caption "
          f"{column!r}, or set data.caption_key to the column that holds "
          "the captions.")
    name = _normalise(str(row["file_name"]))
    if name not in known:
      raise DataError(
          f"{where} names {name!r}, which is not an image under "
          f"data.path={root!r} (.jpg/.jpeg/.png/.webp); fix the file_name or "
          "add the image.")
    if name in captions:
      raise DataError(f"{where} names {name!r} a second time; give each "
                       "image one row.")
    captions[name] = sources.to_text(row[column]).strip()
  return captions


def _text_file_captions(root: str, images: Sequence[str]) -> Dict[str, str]:
  """{relative path: the .txt beside it} for the images that have one."""
  captions = {}
  for name in images:
    txt = os.path.join(root, os.path.splitext(name)[0] + ".txt")
    if os.path.isfile(txt):
      with open(txt, encoding="utf-8", errors="replace") as f:
        captions[name] = f.read().strip()
  return captions


@sources.register_source("imagefolder")
class ImageFolderSource(sources.RandomAccessSource):
  """Files under `root` (relative paths) with one caption each."""

  def __init__(self, root: str, files: Sequence[str],
               captions: Sequence[str]):
    if len(files) != len(captions):
      raise ValueError("files and captions differ in length")
    self.root = root
    self.files = list(files)
    self.captions = list(captions)

  @classmethod
  def from_config(cls, data_config, split: str) -> "ImageFolderSource":
    root = sources.require_path(data_config, "path",
                                "a folder of captioned images")
    images = list_images(root)
    if not images:
      raise DataError(
          f"data.path={root!r} holds no images (.jpg, .jpeg, .png, .webp, "
          "searched recursively); point data.path at the image folder.")
    caption_key = sources.config_field(data_config, "caption_key")
    captions = _metadata_captions(root, images, caption_key)
    captions.update({k: v for k, v in _text_file_captions(root, images).items()
                     if k not in captions})
    if not captions:
      captions = cls._class_captions(root, images, data_config)
    missing = [name for name in images if name not in captions]
    if missing:
      metadata = [m for m in METADATA_FILES
                  if os.path.isfile(os.path.join(root, m))]
      how = (f"add a row for each to {metadata[0]} (or a .txt caption beside "
             "it), or remove those images" if metadata else HOW_TO_CAPTION)
      raise DataError(
          f"{len(missing)} of {len(images)} images under data.path={root!r} "
          f"have no caption, e.g. {missing[0]!r}"
          f"{f' (no row in {metadata[0]})' if metadata else ''}; {how}.")
    fraction = data_config.get("holdout_fraction", 0.0)
    if fraction > 0:
      images = [name for name in images
                if held_out(name, fraction) == (split != "train")]
      if not images:
        raise DataError(
            f"data.holdout_fraction={fraction} leaves split {split!r} of "
            f"data.path={root!r} without images; raise or lower "
            "data.holdout_fraction, or add images.")
    return cls(root, images, [captions[name] for name in images])

  @staticmethod
  def _class_captions(root: str, images: Sequence[str], data_config
                      ) -> Dict[str, str]:
    """Captions from class subfolders and data.caption_template, if any."""
    classes = sorted({name.split("/")[0] for name in images if "/" in name})
    if not classes:
      return {}
    template = sources.check_template(
        sources.config_field(data_config, "caption_template"),
        ("label", "label_name"), "imagefolder (class subfolders)")
    class_captions = dict(zip(classes,
                              sources.label_captions(template, classes)))
    return {name: class_captions[name.split("/")[0]] for name in images
            if "/" in name}

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> sources.Example:
    index = self._check_index(index)
    name = self.files[index]
    return {"image": sources.read_bytes(os.path.join(self.root, name), name),
            "caption": self.captions[index], "key": name}

  def caption(self, index: int) -> str:
    return self.captions[index]

  def image_size(self, index: int):
    """(height, width) of image `index` from its header (data.buckets);
    None if it does not open."""
    from jaxsd.data import buckets  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.root, self.files[self._check_index(index)])
    try:
      with open(path, "rb") as f:
        return buckets.image_size(f)
    except OSError:
      return None

  def statistics(self):
    return {**super().statistics(), "path": self.root}
