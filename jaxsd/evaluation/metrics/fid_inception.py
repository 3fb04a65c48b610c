"""fid_inception: the standard FID (pytorch-fid's Inception-v3 weights).

Comparable with published FIDs. Samples go in at their own size (the network
resizes to 299x299); the reference is the real images of the held-out split
(eval.reference_split) transformed as training images are (MNIST padded with
background), so the transform does not count as a difference. Skipped when
the weights are missing offline; a file named as pytorch-fid's weights with
another sha256 is refused (jaxsd/evaluation/inception.py).

The reference statistics are cached under the network's identity, which
holds the weights file's sha256 prefix: statistics computed with one
weights file are never used with another.
"""
import os

from jaxsd.evaluation import fid
from jaxsd.evaluation.metrics import registry
from jaxsd.hub import WeightsUnavailableError


@registry.register_metric("fid_inception")
class InceptionFID(registry.Metric):

  def __init__(self):
    self.net = None
    self._references = {}  # image size -> statistics

  def min_samples(self, config, num_prompts):
    del config, num_prompts
    return 2, "the samples' feature covariance needs at least 2 images"

  def prepare(self, ctx):
    from jaxsd.evaluation import inception  # pylint: disable=g-import-not-at-top
    try:
      self.net = inception.load_fid_inception(
          ctx.eval_config.inception_weights or None, cache_dir=ctx.cache_dir)
    except WeightsUnavailableError as e:
      raise WeightsUnavailableError(
          f"no FID Inception weights ({e}); set eval.inception_weights to "
          f"{inception.FID_WEIGHTS_FILE}") from e
    self.reference(ctx, ctx.config.data.image_size)

  def reference(self, ctx, image_size: int) -> fid.Statistics:
    """(mu [2048], sigma) of the first eval.inception_reference_samples
    images of the held-out split (eval.reference_split) at image_size x
    image_size, cached per weights (their sha256), dataset and size."""
    if image_size not in self._references:
      n = ctx.eval_config.inception_reference_samples
      name = ctx.reference_name()
      # Unpadded MNIST: no size in the name (its form before sizes were added).
      extra = (f"n{n}" if image_size == 28 and name.startswith("mnist-")
               else f"n{n}-{image_size}px")

      def compute():
        return fid.feature_statistics(self.net(ctx.real_images(n, image_size)))
      self._references[image_size] = fid.cached_statistics(
          os.path.join(ctx.cache_dir, "fid_stats"),
          fid.reference_statistics_name(self.net.identity, name, extra),
          compute)
    return self._references[image_size]

  def __call__(self, images, prompts, ctx):
    if images.shape[1] != images.shape[2]:
      raise ValueError(f"fid_inception needs square images, got "
                       f"{images.shape}")
    mu, sigma = self.reference(ctx, images.shape[1])
    return {"fid_inception": fid.frechet_distance(
        *fid.feature_statistics(self.net(images)), mu, sigma)}
