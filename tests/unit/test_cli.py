"""The commands: their modules import together; each prints its --help."""
import importlib
import sys

from absl import flags
import pytest

COMMANDS = {  # module: (console script, flags it must list)
    "jaxsd.commands.train": ("jaxsd-train", ["--config", "--workdir"]),
    "jaxsd.commands.sample": ("jaxsd-sample", ["--workdir", "--prompt", "--sampler"]),
    "jaxsd.commands.evaluate": ("jaxsd-evaluate", ["--workdir", "--all_checkpoints"]),
    "jaxsd.commands.plot_runs": ("jaxsd-plot-runs", ["--workdir", "--metrics"]),
    "jaxsd.commands.train_autoencoder": ("jaxsd-train-autoencoder",
                                ["--config", "--workdir"]),
    "jaxsd.commands.cache": ("jaxsd-cache", ["--config", "--out", "--batch_size",
                                    "--text_embeddings"]),
    "jaxsd.commands.export": ("jaxsd-export", ["--workdir", "--out", "--merge_lora"]),
    "jaxsd.commands.sync_mlflow": ("jaxsd-sync-mlflow", ["--workdir", "--to"]),
}


def test_all_commands_import_together_without_defining_flags():
  modules = [importlib.import_module(name) for name in COMMANDS]
  by_module = flags.FLAGS.flags_by_module_dict()
  # Their flags come with run(), not with import.
  assert not any(by_module.get(name) for name in COMMANDS)
  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import sample_run
  from jaxsd.evaluation import checkpoints
  # pylint: enable=g-import-not-at-top
  assert callable(sample_run.generate_for_prompts)
  assert callable(sample_run.read_prompts)
  assert callable(checkpoints.evaluate_checkpoints)
  assert callable(checkpoints.write_tables)
  assert all(callable(m.run) for m in modules)


@pytest.mark.parametrize("module_name", sorted(COMMANDS))
def test_help_lists_the_commands_flags_and_exits_0(module_name, fresh_flags,
                                                   monkeypatch, capsys):
  del fresh_flags
  script, names = COMMANDS[module_name]
  module = importlib.import_module(module_name)
  # As a console script starts it: sys.argv[0] is the script, not the module.
  monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
  with pytest.raises(SystemExit) as exit_info:
    module.run()
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(module.__doc__)
  for name in names:
    assert f"{name}:" in out or f"--[no]{name[2:]}:" in out, (name, out)
