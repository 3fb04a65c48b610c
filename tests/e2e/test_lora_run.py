"""A LoRA run (model.lora) end to end: it checkpoints the adapters alone,
resumes, and inference merges the EMA adapters into the base at a chosen
scale."""
import os

import jax
import numpy as np
import pytest

from jaxsd.diffusion import setup as build
from jaxsd.models import lora as lora_lib


def _lora_config(tiny_config):
  config = tiny_config()
  config.model.lora.rank = 2
  config.model.lora.alpha = 4.0
  config.eval.metrics = ()
  return config


@pytest.mark.mnist
def test_lora_run_checkpoints_adapters_resumes_and_samples(tiny_config,
                                                           tmp_path):
  from jaxsd.checkpointing import checkpoints as checkpoint  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = _lora_config(tiny_config)
  config.training.num_steps = 2
  diffusion_task.train_and_evaluate(config, workdir)
  config = _lora_config(tiny_config)
  state = diffusion_task.train_and_evaluate(config, workdir)  # resumes 2 -> 4
  assert int(state.step) == 4
  mngr = checkpoint.manager(workdir, read_only=True)
  assert mngr.all_steps() == [2, 4]
  mngr.close()
  # The checkpoint holds adapters: far smaller than the base.
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
             os.walk(os.path.join(workdir, "checkpoints", "4")) for f in fs)
  setup = build.TrainSetup(config)
  base_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(
      setup.base_params))
  assert size < 0.5 * base_bytes
  # Inference merges the EMA adapters into the base, at a chosen scale.
  mesh = parallel.make_mesh()
  _, comps, merged, step = build.restore_for_inference(workdir, mesh)
  _, _, half, _ = build.restore_for_inference(workdir, mesh, lora_scale=0.5)
  _, _, adapters, _ = build.restore_for_inference(workdir, mesh,
                                                  merge_lora=False)
  assert step == 4
  expected = lora_lib.merge(setup.base_params["unet"], adapters["unet"],
                            4.0, 1.0)
  for a, b in zip(jax.tree_util.tree_leaves(merged["unet"]),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  key = "down_blocks_1"
  q = lambda p: np.asarray(p["unet"][key]["attentions_0"][
      "transformer_blocks_0"]["attn1"]["to_q"]["kernel"])
  base_q = q(setup.base_params)
  np.testing.assert_allclose(q(half) - base_q, 0.5 * (q(merged) - base_q),
                             atol=1e-6)
  assert np.abs(q(merged) - base_q).max() > 0
