"""The `webdataset` source: tar shards as img2dataset writes them.

A shard holds samples as consecutive members sharing a key: `key.jpg` (or
.jpeg/.png/.webp) with `key.txt` and/or `key.json`. The key is the member's
path up to the first "." of its file name (webdataset's convention). The
caption is the json field `data.caption_key` when that is set, else the .txt
file, else the json's "caption" or "text" field. A sample missing its image
or caption is skipped; each shard logs how many it skipped.

`data.path` names the shards: a path, a folder (its *.tar files), a glob
(`data/*.tar`), a brace pattern (`data/{00000..00099}.tar`, `{a,b}`; ranges
zero-padded as written), or several of these joined by "::". `shards` is the
sorted, de-duplicated list; a pattern that matches no file is an error.
Shards are read with the stdlib `tarfile` in stream mode ("r|*", so .tar.gz
works too), one member at a time: memory holds one sample, never a shard.
"""
import glob
import json
import os
import posixpath
import re
import tarfile
from typing import Dict, Iterator, List, Optional, Tuple

from absl import logging

from jaxsd.data import sources

IMAGE_SUFFIXES = tuple(e[1:] for e in sources.IMAGE_EXTENSIONS)
VALIDATION_SAMPLES = 100  # samples of the first shard read by from_config
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


# ---------------------------------------------------------------------------
# Shard names: brace expansion, globs, "::" lists.


def _matching_brace(s: str, start: int) -> int:
  depth = 0
  for i in range(start, len(s)):
    if s[i] == "{":
      depth += 1
    elif s[i] == "}":
      depth -= 1
      if depth == 0:
        return i
  return -1


def _alternatives(body: str) -> Optional[List[str]]:
  """What `{body}` expands to, or None if it is not a range or a list."""
  match = _RANGE.fullmatch(body)
  if match:
    a, b = match.groups()
    lo, hi = int(a), int(b)
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0")
                 for x in (a, b))
    width = max(len(a), len(b)) if padded else 0
    step = 1 if hi >= lo else -1
    return [str(n).zfill(width) for n in range(lo, hi + step, step)]
  parts, depth, last = [], 0, 0
  for i, ch in enumerate(body):
    depth += (ch == "{") - (ch == "}")
    if ch == "," and depth == 0:
      parts.append(body[last:i])
      last = i + 1
  parts.append(body[last:])
  return parts if len(parts) > 1 else None


def expand_braces(pattern: str) -> List[str]:
  """Shell-style brace expansion, in order: "s{00..02}" -> s00, s01, s02.

  Supports numeric ranges (zero-padded when an end is written with a leading
  zero; descending too), comma lists, several and nested groups. Braces that
  are neither (`{x}`) stay literal.
  """
  return _expand(pattern, 0)


def _expand(s: str, pos: int) -> List[str]:
  start = s.find("{", pos)
  while start != -1:
    end = _matching_brace(s, start)
    if end == -1:
      break
    alternatives = _alternatives(s[start + 1:end])
    if alternatives is not None:
      head, tail = s[:start], s[end + 1:]
      # Rescan from `start`: an alternative may hold a nested group.
      return [out for alt in alternatives
              for out in _expand(head + alt + tail, start)]
    start = s.find("{", start + 1)
  return [s]


def expand_shards(spec: str) -> List[str]:
  """The sorted, de-duplicated shard files `spec` names (see module doc).

  Raises:
    ValueError: spec is empty or a part of it matches no file.
  """
  patterns = [p.strip() for p in spec.split("::") if p.strip()]
  if not patterns:
    raise ValueError("data.source='webdataset' needs data.path: shard paths, "
                     "a glob or a brace pattern (data/{00000..00099}.tar).")
  shards, missing = set(), []
  for part in patterns:
    for pattern in expand_braces(os.path.expanduser(part)):
      if glob.has_magic(pattern):
        found = [p for p in glob.glob(pattern, recursive=True)
                 if os.path.isfile(p)]
      elif os.path.isdir(pattern):
        found = [p for p in glob.glob(os.path.join(pattern, "*.tar*"))
                 if os.path.isfile(p)]
      else:
        found = [pattern] if os.path.isfile(pattern) else []
      if not found:
        missing.append(pattern)
      shards.update(found)
  if missing:
    raise ValueError(
        f"data.path={spec!r}: {len(missing)} shard pattern(s) match no file, "
        f"e.g. {missing[0]!r}; fix the path or pattern (\"::\" joins several).")
  return sorted(shards)


# ---------------------------------------------------------------------------
# Reading a shard.


def _split_name(name: str) -> Tuple[str, str]:
  """"dir/000.jpg" -> ("dir/000", "jpg"); the suffix lowercased."""
  folder, base = posixpath.split(name)
  stem, _, suffix = base.partition(".")
  return posixpath.join(folder, stem), suffix.lower()


def _samples(shard: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
  """(key, {suffix: bytes}) of a shard's samples, one sample in memory."""
  key, files, count = None, {}, 0
  try:
    tar = tarfile.open(shard, mode="r|*")
  except tarfile.ReadError as e:  # not a tar at all; a missing file raises
    logging.warning("Shard %r is not a readable tar file (%s); skipped.",
                    shard, e)
    return
  with tar:
    try:
      for member in tar:
        if not member.isfile():
          continue
        name_key, suffix = _split_name(member.name)
        if posixpath.basename(name_key).startswith(".") or not suffix:
          continue  # ._foo (macOS), hidden files, suffix-less files
        if name_key != key:
          if key is not None:
            yield key, files
            count += 1
          key, files = name_key, {}
        files[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
      # A truncated shard (an interrupted copy) ends early; the run goes on.
      logging.warning("Shard %r is truncated or corrupt after %d samples "
                      "(%s: %s); its remaining samples are skipped.", shard,
                      count, type(e).__name__, e)
      return
  if key is not None:
    yield key, files


@sources.register_source("webdataset")
class WebDatasetSource(sources.StreamSource):
  """Tar shards of (image, caption) samples, read one sample at a time."""

  def __init__(self, shards: List[str], caption_key: str = ""):
    if not shards:
      raise ValueError("a webdataset source needs at least one shard")
    self.shards = sorted(shards)
    self.caption_key = caption_key

  @classmethod
  def from_config(cls, data_config, split: str) -> "WebDatasetSource":
    del split  # the shards are the split
    source = cls(expand_shards(sources.config_field(data_config, "path")),
                 sources.config_field(data_config, "caption_key"))
    source._check_first_shard()
    return source

  def _check_first_shard(self):
    """Captions must be found in the first samples of the first shard."""
    seen = set()
    for n, (key, files) in enumerate(_samples(self.shards[0])):
      if self._example(key, files) is not None:
        return
      seen.update(files)
      if n + 1 >= VALIDATION_SAMPLES:
        break
    if not seen:
      logging.warning("webdataset: the first shard %r holds no samples.",
                      self.shards[0])
      return
    wanted = (f"a json field {self.caption_key!r} (data.caption_key)"
              if self.caption_key else
              "a .txt file or a .json with a 'caption' or 'text' field")
    raise ValueError(
        f"No captioned image found in the first samples of shard "
        f"{self.shards[0]!r} (data.path): each sample needs an image "
        f"({', '.join(IMAGE_SUFFIXES)}) and {wanted}; its files have "
        f"suffixes {sorted(seen)}. Set data.caption_key to the json field "
        "holding the caption.")

  def _caption(self, files: Dict[str, bytes]) -> Optional[str]:
    meta = None
    if "json" in files:
      try:
        meta = json.loads(files["json"])
      except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
      if not isinstance(meta, dict):
        meta = None
    if self.caption_key:
      fields = (self.caption_key,)
    elif "txt" in files:
      return sources.to_text(files["txt"]).strip()
    else:
      fields = ("caption", "text")
    for field in fields:
      if meta is not None and meta.get(field) is not None:
        return sources.to_text(meta[field]).strip()
    return None

  def _example(self, key: str, files: Dict[str, bytes]
               ) -> Optional[sources.Example]:
    image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
    caption = self._caption(files) if image is not None else None
    if caption is None:
      return None
    return {"image": image, "caption": caption, "key": key}

  def read_shard(self, shard: str) -> Iterator[sources.Example]:
    """The shard's examples in file order; incomplete samples skipped."""
    skipped, first = 0, None
    for key, files in _samples(shard):
      example = self._example(key, files)
      if example is None:
        skipped += 1
        first = first or key
        continue
      yield example
    if skipped:
      logging.warning("Shard %r: %d samples without an image or a caption "
                      "skipped (first: %r).", shard, skipped, first)

  def statistics(self):
    stats = super().statistics()
    # img2dataset writes <shard>_stats.json with the shard's sample count.
    counts = []
    for shard in self.shards:
      stem = shard.split(".tar")[0]
      try:
        with open(stem + "_stats.json", encoding="utf-8") as f:
          counts.append(int(json.load(f)["successes"]))
      except (OSError, ValueError, KeyError, TypeError):
        break
    if len(counts) == len(self.shards):
      stats["examples"] = sum(counts)
    return stats
