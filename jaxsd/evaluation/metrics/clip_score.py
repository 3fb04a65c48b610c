"""clip_score: mean image-prompt cosine similarity under a CLIP model.

`clip_score` is on the 0-1 scale of the original project, `clip_score_x100`
on torchmetrics'. Scores the first eval.num_clip_samples samples, at their
own size (CLIP's preprocessing resizes). Skipped when the model is missing
offline.
"""
from jaxsd.evaluation.metrics import registry
from jaxsd.hub import WeightsUnavailableError


@registry.register_metric("clip_score")
class ClipScore(registry.Metric):

  def __init__(self):
    self.scorer = None

  def min_samples(self, config, num_prompts):
    del config, num_prompts
    return 1, "one image-prompt pair"

  def prepare(self, ctx):
    # transformers is imported only when CLIP is configured.
    from jaxsd.evaluation import clip_score  # pylint: disable=g-import-not-at-top
    model = ctx.eval_config.clip_model
    try:
      self.scorer = clip_score.load_clip_scorer(model)
    except WeightsUnavailableError as e:
      raise WeightsUnavailableError(
          f"CLIP model {model!r} unavailable ({e}); set eval.clip_model to a "
          "local folder") from e

  def __call__(self, images, prompts, ctx):
    n = min(ctx.eval_config.num_clip_samples, len(images))
    score = self.scorer.score(images[:n], list(prompts[:n]))
    return {"clip_score": score["clip_similarity"],
            "clip_score_x100": score["clip_score"]}
