"""Train state (params, EMA params, optimiser state) and the optimiser."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: optimiser updates done
  params: Any  # {"unet": ..., "text": ...}
  ema_params: Any
  opt_state: Any


def param_count(params) -> int:
  """The number of parameters (array elements) in a tree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def learning_rate_schedule(optim_config, num_steps: int):
  """Linear warmup from 0, then cosine decay to lr * end_learning_rate_factor."""
  peak = optim_config.learning_rate
  warmup = min(optim_config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=peak * optim_config.end_learning_rate_factor)


def weight_decay_mask(params):
  """True for weights that decay: kernels. Biases, norm scales, embeddings not."""
  def decays(path, leaf):
    del leaf
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    return name == "kernel"
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config, num_steps: int, text_trainable: bool = True,
                   step_offset: int = 0):
  """AdamW with warmup-cosine, global-norm clipping, masked weight decay.

  `step_offset`: the schedule of an optimiser whose first update is global
  step `step_offset` (its k-th update gets step offset + k's rate), as the
  autoencoder's discriminator, which starts late.
  """
  schedule = learning_rate_schedule(optim_config, num_steps)
  if step_offset:
    schedule = lambda count, s=schedule: s(count + step_offset)
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.adamw(
      schedule, b1=optim_config.b1,
      b2=optim_config.b2, eps=optim_config.eps,
      weight_decay=optim_config.weight_decay, mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if text_trainable:
    return tx
  # A frozen text encoder gets zero updates (and no Adam moments).
  return optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()},
      lambda params: {k: ("frozen" if k == "text" else "train") for k in params})


def ema_decay_at(step, ema_decay: float):
  """EMA decay with warmup, min(decay, (1 + step) / (10 + step)), so early
  averages are not dominated by the random initialisation."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
  return jax.tree_util.tree_map(
      lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype),
      ema_params, params)


def create(params, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=tx.init(params))


def apply_gradients(state: TrainState, grads, tx, ema_decay: float
                    ) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = update_ema(state.ema_params, params, ema_decay_at(state.step, ema_decay))
  return state.replace(step=state.step + 1, params=params, ema_params=ema,
                       opt_state=opt_state)
