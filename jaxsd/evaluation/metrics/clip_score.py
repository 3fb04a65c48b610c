"""clip_score: image-prompt agreement under a CLIP model (eval.clip_model).

Reports three figures of the cosines c_i between each image's and its
prompt's CLIP embeddings (definitions in jaxsd/evaluation/clip_score.py):

  eval/clip_score   max(100 * mean c, 0), 0-100: torchmetrics' CLIPScore,
                    the "CLIP score" papers quote.
  eval/clip_s       2.5 * mean max(c, 0): CLIP-S (Hessel et al. 2021).
  eval/clip_cosine  mean c, unclipped, in [-1, 1].

(Before this naming, eval/clip_score was max(mean c, 0) on a 0-1 scale and
eval/clip_score_x100 the torchmetrics figure; old runs' clip_score is today's
divided by 100.) Scores the first eval.num_clip_samples samples, at their
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
    return self.scorer.score(images[:n], list(prompts[:n]))
