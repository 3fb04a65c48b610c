"""fid_mnist: Fréchet distance to MNIST test in the classifier's features.

The classifier's 128-d penultimate features know digits, unlike Inception's
ImageNet features, so this FID tracks digit quality and class coverage. The
reference statistics are cached per classifier identity.
"""
import os

from jaxsd.evaluation import fid
from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.metrics import registry


@registry.register_metric("fid_mnist")
class MnistFID(registry.Metric):
  data_sources = ("mnist",)  # judged by the MNIST classifier

  def __init__(self):
    self._reference = None

  def min_samples(self, config, num_prompts):
    del config, num_prompts
    return 2, "the samples' feature covariance needs at least 2 images"

  def reference(self, ctx) -> fid.Statistics:
    """(mu [128], sigma [128, 128]) of the MNIST test split."""
    if self._reference is None:
      self._reference = prompt_metrics.mnist_reference_statistics(
          ctx.classifier(), os.path.join(ctx.cache_dir, "fid_stats"), "test",
          lambda: ctx.mnist("test")[0])
    return self._reference

  def prepare(self, ctx):
    self.reference(ctx)

  def __call__(self, images, prompts, ctx):
    _, features = ctx.classifier_outputs(images)
    return {"fid_mnist": fid.frechet_distance(
        *fid.feature_statistics(features), *self.reference(ctx))}
