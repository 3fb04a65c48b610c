"""prompt_accuracy: does the MNIST classifier see the digit that was asked for?

Share of the samples drawn for digit d that the classifier labels d, per
digit (`prompt_accuracy/<d>`), their mean (each digit weighs the same) and the
worst digit (`prompt_accuracy_min`).
"""
from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.metrics import registry


@registry.register_metric("prompt_accuracy")
class PromptAccuracy(registry.Metric):
  data_sources = ("mnist",)  # judged by the MNIST classifier

  def min_samples(self, config, num_prompts):
    del config
    n = num_prompts or 1
    return n, (f"one per prompt x {n} prompt{'s' * (n != 1)}: the per-digit "
               "accuracies need a sample of every prompted digit")

  def prepare(self, ctx):
    ctx.classifier()

  def __call__(self, images, prompts, ctx):
    logits, _ = ctx.classifier_outputs(images)
    out = prompt_metrics.flat_per_digit(
        "prompt_accuracy", prompt_metrics.prompt_accuracy(
            logits.argmax(-1), ctx.prompt_digits(prompts)))
    per_digit = [v for k, v in out.items() if "/" in k]
    if per_digit:
      out["prompt_accuracy_min"] = min(per_digit)
    return out
