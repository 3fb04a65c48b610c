"""Every metric `eval.metrics` can name, one module each.

Importing this package registers them all. To add a metric: write a module
here with a `registry.Metric` subclass decorated
`@registry.register_metric("name")` (shared networks and data come from the
`EvalContext` it is given), and import it below. The evaluator finds metrics
by name; it has no list of its own.
"""
# pylint: disable=unused-import
from jaxsd.evaluation.metrics import registry
from jaxsd.evaluation.metrics import clip_score
from jaxsd.evaluation.metrics import diversity
from jaxsd.evaluation.metrics import fid_inception
from jaxsd.evaluation.metrics import fid_mnist
from jaxsd.evaluation.metrics import prompt_accuracy
from jaxsd.evaluation.metrics import val_loss
# pylint: enable=unused-import

Metric = registry.Metric
register_metric = registry.register_metric
metric_names = registry.metric_names
get_metric = registry.get_metric
