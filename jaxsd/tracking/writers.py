"""The run's metric writers: the console, TensorBoard and MLflow on process
0; the console alone on the others."""
import jax

from jaxsd.tracking import metric_writer
from jaxsd.tracking import mlflow_store


def create_writers(config, workdir: str):
  """(writer, mlflow_writer or None): console + TensorBoard events in
  workdir (+ MLflow unless config.logging.mlflow is off) on process 0; a
  console-only writer elsewhere."""
  if jax.process_index() > 0:
    return metric_writer.LoggingWriter(), None
  default = [metric_writer.LoggingWriter(),
             metric_writer.TensorBoardWriter(workdir)]
  if not config.logging.mlflow:
    return metric_writer.MultiWriter(default), None
  mlflow_writer = mlflow_store.MlflowWriter(workdir, config.logging.experiment_name,
                               config.logging.run_name)
  return metric_writer.MultiWriter([*default, mlflow_writer]), mlflow_writer
