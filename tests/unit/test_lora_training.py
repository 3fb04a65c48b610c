"""LoRA runs (model.lora): only adapters train and are checkpointed; the
base is a frozen input of the step; sampling merges the adapters in.

The adapters' own maths and diffusers' file format are tests/unit/test_lora.py's;
a whole LoRA run: tests/e2e/test_lora_run.py.
"""
import jax
import numpy as np
import pytest

from jaxsd.diffusion import setup as build
from jaxsd.training import state as ts
from jaxsd.models import lora as lora_lib


def _lora_config(tiny_config, rank=2, **lora):
  config = tiny_config()
  config.model.lora.rank = rank
  config.model.lora.alpha = 4.0
  config.model.lora.update(lora)
  return config


def _batch(setup, seed=0):
  comps = setup.components
  b = setup.config.training.batch_size
  rng = np.random.default_rng(seed)
  return setup.global_batch({
      "image": rng.uniform(-1, 1, (b,) + comps.image_shape).astype(
          np.float32),
      "input_ids": np.tile(comps.uncond_ids[0], (b, 1))})


def test_lora_state_holds_adapters_alone_and_steps_train_only_them(
    tiny_config):
  config = _lora_config(tiny_config, text_targets=("q_proj", "v_proj"),
                        dropout=0.1)
  setup = build.TrainSetup(config)
  state = setup.create_train_state(jax.random.key(0))
  base = setup.base_params
  # The state: adapters for every attention projection of the UNet and the
  # targeted text projections; nothing of the base.
  unet_paths = lora_lib.target_paths(base["unet"], lora_lib.UNET_TARGETS)
  # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions x 4 targets.
  assert len(unet_paths) == 32
  assert ts.param_count(state.params) < 0.2 * ts.param_count(base)
  flat = jax.tree_util.tree_leaves_with_path(state.params)
  assert all(path[-1].key in ("down", "up") for path, _ in flat)
  assert len(state.params["text"]["text_model"]["encoder"]["layers"]["0"]
             ["self_attn"]) == 2
  # A fresh adapter is the base: the merged params equal it.
  merged = setup.inference_params(state.params)
  for a, b in zip(jax.tree_util.tree_leaves(merged),
                  jax.tree_util.tree_leaves(base)):
    np.testing.assert_array_equal(a, b)

  step = setup.make_train_step(donate=False)
  base_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(base)]
  new, metrics = step(state, _batch(setup), jax.random.key(1))
  assert np.isfinite(metrics["loss"])
  new, _ = step(new, _batch(setup), jax.random.key(1))  # lr 0 at step 0
  ups = [np.abs(np.asarray(x)).max() for p, x in
         jax.tree_util.tree_leaves_with_path(new.params)
         if p[-1].key == "up"]
  assert min(ups) > 0  # every adapter (text ones too) got an update
  for a, b in zip(base_before, jax.tree_util.tree_leaves(setup.base_params)):
    np.testing.assert_array_equal(a, b)
  # The merged model is no longer the base, and differs at the targets only.
  merged = jax.tree_util.tree_leaves_with_path(setup.inference_params(
      new.params)["unet"])
  base_flat = dict(jax.tree_util.tree_leaves_with_path(base["unet"]))
  changed = {jax.tree_util.keystr(p) for p, x in merged
             if not np.array_equal(x, base_flat[p])}
  assert changed and all(
      any(f"'{t}'" in c for t in lora_lib.UNET_TARGETS) for c in changed)
  # Dropout: the step is reproducible (its key is fold_in(rng, step)).
  again, m2 = step(state, _batch(setup), jax.random.key(1))
  np.testing.assert_array_equal(metrics["loss"], m2["loss"])


def test_lora_with_a_frozen_text_encoder_and_bf16_base(tiny_config):
  config = _lora_config(tiny_config, base_dtype="bfloat16")
  config.text.trainable = False
  setup = build.TrainSetup(config)
  assert {x.dtype for x in jax.tree_util.tree_leaves(setup.base_params)} == {
      np.dtype("bfloat16")}
  state = setup.create_train_state(jax.random.key(0))
  assert state.params["text"] == {}
  new, metrics = setup.make_train_step(donate=False)(
      state, _batch(setup), jax.random.key(1))
  assert np.isfinite(metrics["loss"])
  assert {x.dtype for x in jax.tree_util.tree_leaves(new.params)} == {
      np.dtype("float32")}  # adapters and their updates stay f32


def test_bad_lora_settings_are_clear_errors(tiny_config):
  with pytest.raises(ValueError, match="LoRA dropout"):
    build.build_components(_lora_config(tiny_config, dropout=1.5))
  with pytest.raises(ValueError, match="base_dtype"):
    build.build_components(_lora_config(tiny_config, base_dtype="int8"))
  config = _lora_config(tiny_config, unet_targets=("to_nothing",))
  with pytest.raises(ValueError, match="to_nothing"):
    build.TrainSetup(config)
  with pytest.raises(ValueError, match="model.lora.rank"):
    build.build_components(_lora_config(tiny_config, rank=-1))
