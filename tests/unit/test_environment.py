"""Configs read no environment; jaxsd.environment.resolve fills them."""
import importlib

from configs import default
from jaxsd import environment


def test_config_files_read_no_environment(monkeypatch):
  before = default.get_config().to_dict()
  for name in (environment.MNIST_DIR, environment.CLIP_TOKENIZER,
               environment.TFDS_DATA_DIR, environment.CACHE):
    monkeypatch.setenv(name, "/from/the/environment")
  importlib.reload(default)
  assert default.get_config().to_dict() == before
  assert before["text"]["tokenizer"] == ""


def test_resolve_fills_empty_fields_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(environment.MNIST_DIR, str(tmp_path / "mnist"))
  monkeypatch.setenv(environment.CLIP_TOKENIZER, str(tmp_path / "tok"))
  monkeypatch.setenv(environment.CACHE, str(tmp_path / "cache"))
  monkeypatch.delenv(environment.TFDS_DATA_DIR, raising=False)
  config = environment.resolve(default.get_config())
  assert config.data.mnist_dir == str(tmp_path / "mnist")
  assert config.text.tokenizer == str(tmp_path / "tok")
  assert config.eval.cache_dir == str(tmp_path / "cache")
  assert config.data.tfds_data_dir.endswith("tensorflow_datasets")
  # Idempotent: a resolved config stays as it is.
  assert environment.resolve(config).to_dict() == config.to_dict()


def test_given_values_win_and_new_folders_are_kept(monkeypatch, tmp_path):
  monkeypatch.setenv(environment.CACHE, str(tmp_path / "env_cache"))
  monkeypatch.delenv(environment.CLIP_TOKENIZER, raising=False)
  config = default.get_config()
  config.eval.cache_dir = str(tmp_path / "not_yet_created")
  environment.resolve(config)
  assert config.eval.cache_dir == str(tmp_path / "not_yet_created")
  assert config.text.tokenizer == environment.DEFAULT_TOKENIZER


def test_a_reopened_run_from_elsewhere_takes_this_machines_paths(
    monkeypatch, tmp_path):
  saved = default.get_config()
  saved.text.tokenizer = "/elsewhere/clip_tokenizer"
  saved.data.mnist_dir = "/elsewhere/mnist"
  saved.eval.cache_dir = "/elsewhere/cache"
  monkeypatch.setenv(environment.CACHE, str(tmp_path / "cache"))
  monkeypatch.delenv(environment.MNIST_DIR, raising=False)
  monkeypatch.delenv(environment.CLIP_TOKENIZER, raising=False)
  config = environment.resolve(saved.copy_and_resolve_references(),
                               reopened=True)
  assert config.eval.cache_dir == str(tmp_path / "cache")
  # This machine names no other MNIST folder or tokenizer: the run's stay
  # (a missing folder then fails with its name, not with a guess).
  assert config.data.mnist_dir == "/elsewhere/mnist"
  assert config.text.tokenizer == "/elsewhere/clip_tokenizer"
  monkeypatch.setenv(environment.CLIP_TOKENIZER, str(tmp_path / "tok"))
  config = environment.resolve(saved.copy_and_resolve_references(),
                               reopened=True)
  assert config.text.tokenizer == str(tmp_path / "tok")
