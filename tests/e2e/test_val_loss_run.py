"""A training run logs eval/val_loss and jaxsd-evaluate reproduces it. The
rest: tests/unit/test_val_loss.py."""
import pytest


EXAMPLES = 12  # two chunks of 8: the second padded
BINS = 5


def _val_config(tiny_config):
  config = tiny_config()
  config.eval.metrics = ("val_loss",)
  config.eval.val_loss_examples = EXAMPLES
  config.eval.val_loss_timesteps = BINS
  config.eval.chunk_size = 8
  return config


@pytest.mark.mnist
def test_training_logs_val_loss_and_jaxsd_evaluate_reproduces_it(
    tiny_config, tmp_path):
  """The trainer's Evaluate chore logs eval/val_loss (and its bins); the
  checkpoint's evaluation by jaxsd-evaluate's library gives the same
  numbers."""
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import checkpoints as eval_checkpoints  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store  # pylint: disable=g-import-not-at-top
  config = _val_config(tiny_config)
  config.training.update(num_steps=2, eval_every=2, checkpoint_every=2)
  workdir = str(tmp_path)
  diffusion_task.train_and_evaluate(config, workdir)
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  run, = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  logged = {k[len("eval/"):]: v for k, v in run.data.metrics.items()
            if k.startswith("eval/val_loss")}
  assert len(logged) == 1 + BINS
  result, = eval_checkpoints.evaluate_checkpoints(workdir, [2])
  assert result["step"] == 2
  for name, value in logged.items():
    assert result[name] == pytest.approx(value, rel=1e-6), name
