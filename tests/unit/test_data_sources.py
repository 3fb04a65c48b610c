"""Captioned image sources (jaxsd.data.sources): each layout written here."""
import csv
import io
import json
import logging
import os
import pickle
import tarfile

import numpy as np
from PIL import Image
import pytest

from configs import default
from jaxsd import hub
from jaxsd.data import mnist as input_pipeline
from jaxsd.data import source_webdataset
from jaxsd.data import sources

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _config(**fields):
  data = default.get_config().data
  for name, value in fields.items():
    setattr(data, name, value)
  return data


def _size(i):
  """A distinct (width, height) per image, so shapes check the right file."""
  return 8 + i % 5, 6 + i % 3


def _encoded(i, ext=".png", mode="RGB"):
  image = Image.new(mode, _size(i), color=(i * 7 % 256) if mode == "L" else
                    (i * 7 % 256, 40, 200))
  buffer = io.BytesIO()
  image.save(buffer, FORMATS[ext])
  return buffer.getvalue()


def _write_image(path, i, ext=None, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(_encoded(i, ext or os.path.splitext(path)[1], mode))


def _shape(i, channels=3):
  w, h = _size(i)
  return (h, w, channels)


def _examples(source):
  return [source[i] for i in range(len(source))]


def _assert_pickles(source):
  """Grain workers get the source pickled; the copy reads the same examples."""
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source)
  for i in (0, len(source) - 1):
    a, b = source[i], copy[i]
    assert a["caption"] == b["caption"] and a["key"] == b["key"]
    np.testing.assert_array_equal(sources.decode_image(a["image"]),
                                  sources.decode_image(b["image"]))


# ---------------------------------------------------------------------------
# Registry


def test_registry_names_every_source():
  assert sources.source_names() == ["coco", "huggingface", "imagefolder",
                                    "mnist", "tfds", "webdataset"]


def test_unknown_source_names_the_field():
  with pytest.raises(ValueError, match=r"data\.source.*imagefolder"):
    sources.make_source(_config(source="laion"))


def test_register_source_refuses_a_taken_name():
  with pytest.raises(ValueError, match="already registered"):
    sources.register_source("coco")(type("Other", (), {
        "from_config": classmethod(lambda cls, c, s: None)}))


def test_template_fields():
  assert sources.template_fields("a {label_name} ({label:02d})") == [
      "label_name", "label"]
  with pytest.raises(ValueError, match="data.caption_template"):
    sources.template_fields("a {}")


# ---------------------------------------------------------------------------
# decode_image


def test_decode_image_bytes_and_arrays():
  assert sources.decode_image(_encoded(3)).shape == _shape(3)
  assert sources.decode_image(_encoded(4, mode="L")).shape == _shape(4, 1)
  array = np.zeros((5, 6, 3), np.uint8)
  assert sources.decode_image(array) is array


def test_corrupt_image_decodes_to_none_with_a_warning(tmp_path, caplog):
  _write_image(str(tmp_path / "good.png"), 0)
  with open(tmp_path / "bad.png", "wb") as f:
    f.write(_encoded(1)[:40])  # truncated
  with open(tmp_path / "good.txt", "w") as f:
    f.write("good")
  with open(tmp_path / "bad.txt", "w") as f:
    f.write("bad")
  source = sources.make_source(_config(source="imagefolder",
                                       path=str(tmp_path)))
  bad = source[0]  # sorted: bad.png first; the source does not decode
  assert bad["key"] == "bad.png" and isinstance(bad["image"], bytes)
  with caplog.at_level(logging.WARNING):
    assert sources.decode_image(bad["image"], bad["key"]) is None
  assert "bad.png" in caplog.text
  assert sources.decode_image(source[1]["image"]).shape == _shape(0)


# ---------------------------------------------------------------------------
# mnist (load_mnist replaced: the wrapping is what is tested here)


def test_mnist_captions_labels_with_the_template(monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (12, 28, 28, 1), dtype=np.uint8)
  labels = np.arange(12, dtype=np.int32) % 10
  calls = []

  def fake_load(data_config, split):
    calls.append(split)
    return images, labels
  monkeypatch.setattr(input_pipeline, "load_mnist", fake_load)
  config = _config(source="mnist",
                   caption_template="a photograph of the number {label}")
  source = sources.make_source(config, split="test")
  assert calls == ["test"] and len(source) == 12
  for i, example in enumerate(_examples(source)):
    assert example["caption"] == f"a photograph of the number {labels[i]}"
    np.testing.assert_array_equal(example["image"], images[i])
    assert example["key"] == f"test/{i}"
  assert source.statistics()["caption_words_median"] == 6
  _assert_pickles(source)
  with pytest.raises(ValueError, match=r"data\.caption_template.*label_name"):
    sources.make_source(_config(source="mnist",
                                caption_template="a {label_name}"))


# ---------------------------------------------------------------------------
# imagefolder


def test_imagefolder_metadata_jsonl(tmp_path):
  names = [f"img_{i:02d}.png" for i in range(20)] + [
      f"more/deeper/x{i}.jpg" for i in range(4)]
  captions = {}
  with open(tmp_path / "metadata.jsonl", "w") as f:
    for i, name in enumerate(names):
      _write_image(str(tmp_path / name), i)
      captions[name] = f"caption number {i}, with \"quotes\" and ünïcode"
      f.write(json.dumps({"file_name": name, "text": captions[name],
                          "other": i}) + "\n")
  source = sources.make_source(_config(source="imagefolder",
                                       path=str(tmp_path)))
  assert len(source) == len(names)
  examples = _examples(source)
  assert [e["key"] for e in examples] == sorted(names)
  for e in examples:
    assert e["caption"] == captions[e["key"]]
    i = names.index(e["key"])
    assert sources.decode_image(e["image"]).shape == _shape(i)
  assert [e["key"] for e in _examples(sources.make_source(_config(
      source="imagefolder", path=str(tmp_path))))] == sorted(names)
  stats = source.statistics()
  assert stats["examples"] == 24 and stats["caption_words_min"] == 7
  _assert_pickles(source)


def test_imagefolder_metadata_csv_with_caption_key(tmp_path):
  with open(tmp_path / "metadata.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file_name", "prompt"])
    for i in range(6):
      _write_image(str(tmp_path / f"{i}.webp"), i)
      writer.writerow([f"{i}.webp", f"a, comma-separated caption {i}"])
  source = sources.make_source(_config(source="imagefolder",
                                       path=str(tmp_path),
                                       caption_key="prompt"))
  assert [e["caption"] for e in _examples(source)] == [
      f"a, comma-separated caption {i}" for i in range(6)]
  assert sources.decode_image(source[5]["image"]).shape == _shape(5)
  with pytest.raises(ValueError, match=r"'text'.*data\.caption_key"):
    sources.make_source(_config(source="imagefolder", path=str(tmp_path)))


def test_imagefolder_txt_beside_each_image(tmp_path):
  exts = [".png", ".jpg", ".jpeg", ".webp"]
  for i in range(12):
    _write_image(str(tmp_path / "sub" / f"{i:02d}{exts[i % 4]}"), i)
    with open(tmp_path / "sub" / f"{i:02d}.txt", "w") as f:
      f.write(f"  caption {i}\n")
  with open(tmp_path / "notes.txt", "w") as f:  # no image: ignored
    f.write("x")
  source = sources.make_source(_config(source="imagefolder",
                                       path=str(tmp_path)))
  assert len(source) == 12
  for i, e in enumerate(_examples(source)):
    assert e["key"] == f"sub/{i:02d}{exts[i % 4]}"
    assert e["caption"] == f"caption {i}"
    assert sources.decode_image(e["image"]).shape == _shape(i)


def test_imagefolder_class_subfolders_with_template(tmp_path):
  for c, name in enumerate(["dog", "cat", "bird"]):
    for i in range(4):
      _write_image(str(tmp_path / name / f"{i}.png"), c * 4 + i)
  source = sources.make_source(_config(
      source="imagefolder", path=str(tmp_path),
      caption_template="a photograph of a {label_name} (class {label})"))
  examples = _examples(source)
  assert len(examples) == 12
  # Sorted folders: bird=0, cat=1, dog=2.
  assert examples[0]["caption"] == "a photograph of a bird (class 0)"
  assert examples[11]["caption"] == "a photograph of a dog (class 2)"
  assert {e["caption"] for e in examples if e["key"].startswith("cat/")} == {
      "a photograph of a cat (class 1)"}
  with pytest.raises(ValueError, match=r"data\.caption_template.*\{label\}"):
    sources.make_source(_config(source="imagefolder", path=str(tmp_path),
                                caption_template="a {colour} thing"))


def test_imagefolder_errors_name_the_field(tmp_path):
  def make(**fields):
    return sources.make_source(_config(source="imagefolder", **fields))
  with pytest.raises(ValueError, match=r"needs data\.path"):
    make()
  with pytest.raises(ValueError, match=r"data\.path=.*does not exist"):
    make(path=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match=r"data\.path=.*holds no images"):
    make(path=str(tmp_path))
  _write_image(str(tmp_path / "a.png"), 0)
  _write_image(str(tmp_path / "b.png"), 1)
  with open(tmp_path / "a.txt", "w") as f:
    f.write("only a")
  with pytest.raises(ValueError, match=r"1 of 2 images.*'b\.png'.*metadata"
                     r"\.jsonl.*\.txt.*label_name"):
    make(path=str(tmp_path))
  with open(tmp_path / "metadata.jsonl", "w") as f:
    f.write(json.dumps({"file_name": "b.png", "text": "b"}) + "\n")
    f.write(json.dumps({"file_name": "c.png", "text": "c"}) + "\n")
  with pytest.raises(ValueError, match=r"metadata\.jsonl line 2 names "
                     r"'c\.png'"):
    make(path=str(tmp_path))


# ---------------------------------------------------------------------------
# coco


def _write_coco(tmp_path, num_images=10):
  """Images with 1..5 captions each; ids listed out of order."""
  images, annotations, captions = [], [], {}
  ann_id = 100
  for k in reversed(range(num_images)):
    image_id = 1000 + k
    name = f"{image_id:012d}.jpg"
    _write_image(str(tmp_path / "images" / name), k)
    images.append({"id": image_id, "file_name": name})
    captions[name] = [f"image {k} caption {j}" for j in range(1 + k % 5)]
    for j, caption in enumerate(captions[name]):
      annotations.append({"id": ann_id + j, "image_id": image_id,
                          "caption": caption + " \n"})
    ann_id += 10
  path = tmp_path / "captions_train2017.json"
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations}, f)
  return _config(source="coco", path=str(tmp_path / "images"),
                 captions_file=str(path)), captions


def test_coco_random_caption_per_epoch(tmp_path):
  config, captions = _write_coco(tmp_path)
  source = sources.make_source(config)
  names = sorted(captions)  # increasing image id
  assert len(source) == 10
  for i, e in enumerate(_examples(source)):
    assert e["key"] == names[i]
    assert e["caption"] == captions[names[i]][0]
    assert sources.decode_image(e["image"]).shape == _shape(i)
  draws = [[source.example(i, epoch)["caption"] for i in range(10)]
           for epoch in range(4)]
  copy = pickle.loads(pickle.dumps(source))
  assert draws == [[copy.example(i, epoch)["caption"] for i in range(10)]
                   for epoch in range(4)]
  assert draws[0] != draws[1] != draws[2]
  for epoch in range(4):
    for i in range(10):
      assert draws[epoch][i] in captions[names[i]]
  drawn_of_last = {source.example(9, e)["caption"] for e in range(40)}
  assert drawn_of_last == set(captions[names[9]])  # all 5 get drawn
  assert source.statistics()["captions"] == 30
  _assert_pickles(source)


def test_coco_all_pairs(tmp_path):
  config, captions = _write_coco(tmp_path)
  config.coco_captions = "all"
  source = sources.make_source(config)
  pairs = [(name, c) for name in sorted(captions) for c in captions[name]]
  assert len(source) == len(pairs) == 30
  examples = _examples(source)
  assert [(e["key"].split("#")[0], e["caption"]) for e in examples] == pairs
  assert [e["key"] for e in examples[:4]] == [
      f"{sorted(captions)[0]}#0", f"{sorted(captions)[1]}#0",
      f"{sorted(captions)[1]}#1", f"{sorted(captions)[2]}#0"]
  assert source.example(5, 3) == source[5]
  _assert_pickles(source)


def test_coco_errors_name_the_field(tmp_path):
  config, _ = _write_coco(tmp_path, num_images=3)
  with pytest.raises(ValueError, match=r"data\.coco_captions"):
    config.coco_captions = "first"
    sources.make_source(config)
  config.coco_captions = "random"
  os.remove(tmp_path / "images" / "000000001001.jpg")
  with pytest.raises(ValueError, match=r"'000000001001\.jpg'.*data\.path"):
    sources.make_source(config)
  with pytest.raises(ValueError, match=r"data\.captions_file=.*does not exist"):
    config.captions_file = str(tmp_path / "missing.json")
    sources.make_source(config)
  with open(tmp_path / "other.json", "w") as f:
    json.dump({"images": []}, f)
  with pytest.raises(ValueError, match=r"data\.captions_file.*annotations"):
    config.captions_file = str(tmp_path / "other.json")
    sources.make_source(config)


# ---------------------------------------------------------------------------
# webdataset


def _write_shard(path, samples):
  """samples: (key, {suffix: bytes}) written as consecutive tar members."""
  with tarfile.open(path, "w") as tar:
    for key, files in samples:
      for suffix, data in files.items():
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _write_shards(folder, num_shards=3, per_shard=8):
  """img2dataset layout: 0000s.tar with key.jpg + key.txt + key.json."""
  os.makedirs(folder, exist_ok=True)
  expected = []
  for s in range(num_shards):
    samples = []
    for j in range(per_shard):
      n = s * per_shard + j
      key = f"{s:05d}{j:04d}"
      caption = f"web caption {n}"
      files = {"jpg": _encoded(n, ".jpg"),
               "json": json.dumps({"caption": caption, "alt": f"alt {n}",
                                   "key": key}).encode()}
      if n % 2 == 0:
        files["txt"] = caption.encode()
      samples.append((key, files))
      expected.append((key, caption, n))
    _write_shard(os.path.join(folder, f"{s:05d}.tar"), samples)
  return expected


def test_webdataset_streams_every_sample(tmp_path):
  expected = _write_shards(str(tmp_path))
  source = sources.make_source(_config(source="webdataset",
                                       path=str(tmp_path / "*.tar")))
  assert source.shards == [str(tmp_path / f"{s:05d}.tar") for s in range(3)]
  examples = list(source)
  assert [(e["key"], e["caption"]) for e in examples] == [
      (k, c) for k, c, _ in expected]
  for e, (_, _, n) in zip(examples, expected):
    assert sources.decode_image(e["image"]).shape == _shape(n)
  assert [e["key"] for e in source.read_shard(source.shards[1])] == [
      k for k, _, _ in expected[8:16]]
  copy = pickle.loads(pickle.dumps(source))
  assert copy.shards == source.shards
  assert source.statistics()["shards"] == 3
  with open(tmp_path / "00000_stats.json", "w") as f:
    json.dump({"successes": 8}, f)
  assert "examples" not in source.statistics()  # not every shard has one
  for s in (1, 2):
    with open(tmp_path / f"{s:05d}_stats.json", "w") as f:
      json.dump({"successes": 8}, f)
  assert source.statistics()["examples"] == 24


def test_webdataset_path_forms(tmp_path):
  _write_shards(str(tmp_path / "a"))
  _write_shards(str(tmp_path / "b"), num_shards=2)
  want = sorted([str(tmp_path / "a" / f"{s:05d}.tar") for s in range(3)]
                + [str(tmp_path / "b" / f"{s:05d}.tar") for s in range(2)])
  for spec in (f"{tmp_path}/{{a,b}}/*.tar",
               f"{tmp_path}/b/{{00000..00001}}.tar::{tmp_path}/a",
               f"{tmp_path}/a/{{00002..00000}}.tar :: {tmp_path}/b/*.tar"
               f"::{tmp_path}/a/00001.tar"):
    assert source_webdataset.expand_shards(spec) == want, spec


def test_brace_expansion():
  expand = source_webdataset.expand_braces
  assert expand("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar",
                                            "d/00002.tar"]
  assert expand("{8..11}") == ["8", "9", "10", "11"]
  assert expand("{08..10}") == ["08", "09", "10"]
  assert expand("{3..1}") == ["3", "2", "1"]
  assert expand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
  assert expand("{x,{y,z}0}") == ["x", "y0", "z0"]
  assert expand("lit{x}{1..2}") == ["lit{x}1", "lit{x}2"]
  assert expand("plain.tar") == ["plain.tar"]


def test_webdataset_caption_key_and_skipped_samples(tmp_path, caplog):
  good = {"jpg": _encoded(0, ".jpg"), "txt": b"from txt",
          "json": b'{"caption": "from json", "alt": "alt text"}'}
  _write_shard(str(tmp_path / "0.tar"), [
      ("k0", good),
      ("k1", {"txt": b"no image"}),
      ("k2", {"png": _encoded(1)}),  # no caption
      ("k3", {"webp": _encoded(2, ".webp"),
              "json": b'{"text": "json text"}'}),
      ("dir/k4", {"jpeg": _encoded(3, ".jpeg"), "txt": b"in a folder"}),
  ])
  source = sources.make_source(_config(source="webdataset",
                                       path=str(tmp_path / "0.tar")))
  with caplog.at_level(logging.WARNING):
    examples = list(source.read_shard(source.shards[0]))
  assert [(e["key"], e["caption"]) for e in examples] == [
      ("k0", "from txt"), ("k3", "json text"), ("dir/k4", "in a folder")]
  assert "2 samples without an image or a caption" in caplog.text
  assert sources.decode_image(examples[1]["image"]).shape == _shape(2)
  by_key = sources.make_source(_config(source="webdataset",
                                       path=str(tmp_path / "0.tar"),
                                       caption_key="alt"))
  assert [(e["key"], e["caption"]) for e in by_key] == [("k0", "alt text")]


def test_webdataset_reads_a_truncated_shard_up_to_the_damage(tmp_path, caplog):
  _write_shards(str(tmp_path), num_shards=1, per_shard=30)
  path = str(tmp_path / "00000.tar")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  source = sources.make_source(_config(source="webdataset", path=path))
  with caplog.at_level(logging.WARNING):
    examples = list(source.read_shard(path))
  assert 5 < len(examples) < 30
  assert "truncated" in caplog.text


def test_webdataset_errors_name_the_field(tmp_path):
  _write_shards(str(tmp_path), num_shards=2)
  with pytest.raises(ValueError, match=r"needs data\.path"):
    sources.make_source(_config(source="webdataset"))
  with pytest.raises(ValueError, match=r"data\.path=.*'.*00002\.tar'"):
    sources.make_source(_config(source="webdataset",
                                path=f"{tmp_path}/{{00000..00002}}.tar"))
  with pytest.raises(ValueError, match=r"data\.path=.*match no file"):
    sources.make_source(_config(source="webdataset",
                                path=f"{tmp_path}/*.tgz"))
  with pytest.raises(ValueError,
                     match=r"No captioned image.*data\.caption_key"):
    sources.make_source(_config(source="webdataset", path=str(tmp_path),
                                caption_key="nope"))


# ---------------------------------------------------------------------------
# huggingface


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                      str(tmp_path / "hf_cache"))
  return datasets


def _hf_dataset(datasets, n=16, with_text=True):
  images = [Image.new("RGB", _size(i), (i * 9 % 256, 0, 0)) for i in range(n)]
  columns = {"image": images, "label": [i % 3 for i in range(n)]}
  features = {"image": datasets.Image(),
              "label": datasets.ClassLabel(names=["apple", "banana", "kiwi"])}
  if with_text:
    columns["text"] = [f"hf caption {i}" for i in range(n)]
    features["text"] = datasets.Value("string")
  return datasets.Dataset.from_dict(columns,
                                    features=datasets.Features(features))


def _check_hf(source, n=16):
  assert len(source) == n
  for i, e in enumerate(_examples(source)):
    assert e["caption"] == f"hf caption {i}"
    assert isinstance(e["image"], bytes)  # decoded later, in workers
    assert sources.decode_image(e["image"]).shape == _shape(i)


def test_huggingface_save_to_disk(hf_cache, tmp_path):
  _hf_dataset(hf_cache).save_to_disk(str(tmp_path / "saved"))
  source = sources.make_source(_config(source="huggingface",
                                       path=str(tmp_path / "saved")))
  _check_hf(source)
  assert len(pickle.dumps(source)) < 20_000  # the Arrow file's path, not data
  _assert_pickles(source)
  assert source.statistics()["caption_words_max"] == 3


def test_huggingface_parquet_and_dataset_dict(hf_cache, tmp_path):
  folder = tmp_path / "parquet"
  folder.mkdir()
  _hf_dataset(hf_cache).to_parquet(str(folder / "train-00000.parquet"))
  _hf_dataset(hf_cache, n=4).to_parquet(str(folder / "test-00000.parquet"))
  _check_hf(sources.make_source(_config(source="huggingface",
                                        path=str(folder))))
  _check_hf(sources.make_source(_config(source="huggingface",
                                        path=str(folder)), split="test"), n=4)
  hf_cache.DatasetDict({"train": _hf_dataset(hf_cache),
                        "validation": _hf_dataset(hf_cache, n=3)}
                       ).save_to_disk(str(tmp_path / "dict"))
  _check_hf(sources.make_source(_config(source="huggingface",
                                        path=str(tmp_path / "dict"),
                                        split="validation")), n=3)
  with pytest.raises(ValueError, match=r"data\.split='test'.*validation"):
    sources.make_source(_config(source="huggingface",
                                path=str(tmp_path / "dict"), split="test"))


def test_huggingface_label_captions(hf_cache, tmp_path):
  _hf_dataset(hf_cache, with_text=False).save_to_disk(str(tmp_path / "d"))
  source = sources.make_source(_config(
      source="huggingface", path=str(tmp_path / "d"),
      caption_template="a photograph of a {label_name}"))
  assert [source[i]["caption"] for i in range(4)] == [
      "a photograph of a apple", "a photograph of a banana",
      "a photograph of a kiwi", "a photograph of a apple"]
  with pytest.raises(ValueError, match=r"data\.caption_template.*\{label\}"):
    sources.make_source(_config(source="huggingface",
                                path=str(tmp_path / "d"),
                                caption_template="a {fruit}"))


def test_huggingface_errors_name_the_field(hf_cache, tmp_path, monkeypatch):
  _hf_dataset(hf_cache).save_to_disk(str(tmp_path / "d"))

  def make(**fields):
    return sources.make_source(_config(source="huggingface", **fields))
  with pytest.raises(ValueError, match=r"data\.name.*data\.path"):
    make()
  with pytest.raises(ValueError, match=r"data\.image_key='img'"):
    make(path=str(tmp_path / "d"), image_key="img")
  with pytest.raises(ValueError, match=r"data\.caption_key='prompt'"):
    make(path=str(tmp_path / "d"), caption_key="prompt")
  with pytest.raises(ValueError, match=r"data\.path=.*neither a save_to_disk"):
    make(path=str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match=r"data\.name='nobody/no-such-set'.*"
                     "offline"):
    make(name="nobody/no-such-set")


# ---------------------------------------------------------------------------
# tfds: a tiny builder prepared here (no download); importing TensorFlow
# takes most of these tests' ~10 s.


@pytest.fixture(scope="module")
def tfds_prepared(tmp_path_factory):
  """(name, ArrayRecord data_dir, TFRecord data_dir) of a 3-class dataset."""
  tfds = pytest.importorskip("tensorflow_datasets")
  input_pipeline._hide_gpus_from_tensorflow(  # pylint: disable=protected-access
      pytest.importorskip("tensorflow"))

  class JaxsdTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3)),
           "label": tfds.features.ClassLabel(names=["cat", "dog", "bird"]),
           "caption": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(12),
              "test": self._generate_examples(4)}

    def _generate_examples(self, n):
      for i in range(n):
        w, h = _size(i)
        yield i, {"image": np.full((h, w, 3), i, np.uint8), "label": i % 3,
                  "caption": f"tfds caption {i}"}

  dirs = []
  for file_format in ("array_record", "tfrecord"):
    data_dir = str(tmp_path_factory.mktemp(file_format))
    JaxsdTinyCaptions(data_dir=data_dir,
                      file_format=file_format).download_and_prepare()
    dirs.append(data_dir)
  return ("jaxsd_tiny_captions", *dirs)


def test_tfds_array_record_and_tfrecord(tfds_prepared):
  name, array_record_dir, tfrecord_dir = tfds_prepared
  for data_dir, storage in ((array_record_dir, "disk"),
                            (tfrecord_dir, "memory")):
    source = sources.make_source(_config(
        source="tfds", name=name, tfds_data_dir=data_dir,
        caption_template="a photograph of a {label_name} ({label})"))
    assert len(source) == 12 and source.statistics()["storage"] == storage
    by_caption = {}
    for e in _examples(source):
      image = sources.decode_image(e["image"])
      i = int(image[0, 0, 0])  # each image is filled with its index
      assert image.shape == _shape(i)
      by_caption[i] = e["caption"]
    assert by_caption[4] == "a photograph of a dog (1)"
    assert sorted(by_caption) == list(range(12))
    assert [e["key"] for e in _examples(source)] == [
        f"train/{i}" for i in range(12)]
    _assert_pickles(source)
    text = sources.make_source(_config(source="tfds", name=name,
                                       tfds_data_dir=data_dir,
                                       caption_key="caption"), split="test")
    assert len(text) == 4
    for e in _examples(text):
      i = int(sources.decode_image(e["image"])[0, 0, 0])
      assert e["caption"] == f"tfds caption {i}"


def test_tfds_errors_name_the_field(tfds_prepared, tmp_path, monkeypatch):
  name, data_dir, _ = tfds_prepared

  def make(**fields):
    return sources.make_source(_config(source="tfds", **fields))
  with pytest.raises(ValueError, match=r"needs data\.name"):
    make()
  with pytest.raises(ValueError, match=r"data\.name='no_such_dataset_xyz'"):
    make(name="no_such_dataset_xyz", tfds_data_dir=data_dir)
  with pytest.raises(ValueError, match=r"data\.split='validation'.*test"):
    make(name=name, tfds_data_dir=data_dir, split="validation")
  with pytest.raises(ValueError, match=r"data\.caption_key"):
    make(name=name, tfds_data_dir=data_dir, caption_key="prompt")
  with pytest.raises(ValueError, match=r"data\.caption_template"):
    make(name=name, tfds_data_dir=data_dir, caption_template="a {colour}")
  monkeypatch.setattr(hub, "network_available", lambda host: False)
  with pytest.raises(ValueError, match=r"data\.name=.*not prepared.*no "
                     r"network.*data\.tfds_data_dir"):
    make(name=name, tfds_data_dir=str(tmp_path / "empty"))
