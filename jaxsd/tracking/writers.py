"""The run's metric writers: clu's default writer (TensorBoard + console)
and MLflow on process 0; a console-only writer on the others."""
import jax
from clu import metric_writers

from jaxsd.tracking import mlflow_store


def create_writers(config, workdir: str):
  """(writer, mlflow_writer or None): clu's default writer (TensorBoard +
  console) plus MLflow, on process 0; a console-only writer elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True), None
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  if not config.logging.mlflow:
    return default, None
  mlflow_writer = mlflow_store.MlflowWriter(workdir, config.logging.experiment_name,
                               config.logging.run_name)
  return metric_writers.MultiWriter([default, mlflow_writer]), mlflow_writer
