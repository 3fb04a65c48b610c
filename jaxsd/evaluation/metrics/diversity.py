"""diversity: how varied are the samples of one prompt? (0 = mode collapse)

Mean pairwise distance of the classifier features of one prompt's samples,
per digit (`diversity/<d>`) and their mean; and the same divided by the real
MNIST test digits' value (`diversity_ratio/<d>`, mean `diversity_ratio`,
worst `diversity_ratio_min`), since raw feature distances have no scale of
their own: 1 is as varied as real digits.
"""
import numpy as np

from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.metrics import registry


@registry.register_metric("diversity")
class Diversity(registry.Metric):
  data_sources = ("mnist",)  # judged by the MNIST classifier

  def min_samples(self, config, num_prompts):
    del config
    n = num_prompts or 1
    return 2 * n, (f"2 per prompt x {n} prompt{'s' * (n != 1)}: a distance "
                   "within a prompt needs 2 of its samples")

  def prepare(self, ctx):
    ctx.real_diversity()

  def __call__(self, images, prompts, ctx):
    _, features = ctx.classifier_outputs(images)
    out = prompt_metrics.flat_per_digit("diversity", prompt_metrics.diversity(
        features, ctx.prompt_digits(prompts)))
    ratios = {}
    for d, real in enumerate(ctx.real_diversity()):
      if f"diversity/{d}" in out:
        ratios[f"diversity_ratio/{d}"] = float(out[f"diversity/{d}"] / real)
    if ratios:
      out.update(ratios)
      out["diversity_ratio"] = float(np.mean(list(ratios.values())))
      out["diversity_ratio_min"] = min(ratios.values())
    return out
