"""orbax checkpoints: round trip, latest step, retention, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.training import state as ts


def _state(value):
  params = {"w": jnp.full((3, 2), value), "b": jnp.arange(2.0) + value}
  return ts.TrainState(step=jnp.asarray(int(value), jnp.int32), params=params,
                       ema_params=jax.tree_util.tree_map(lambda x: x / 2,
                                                         params),
                       opt_state={"mu": jnp.ones(4) * value})


def test_round_trip_latest_and_retention(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    checkpoint.save(mngr, step, _state(float(step)),
                    {"step": step, "data_position": step * 10})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 3]  # keeps the last 2
  abstract = jax.eval_shape(lambda: _state(0.0))
  state, meta, step = checkpoint.restore(mngr, abstract)
  assert step == 3 and meta == {"step": 3, "data_position": 30}
  expected = _state(3.0)
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)
  state2, meta2, _ = checkpoint.restore(mngr, abstract, step=2)
  np.testing.assert_array_equal(state2.params["w"], 2.0)
  assert meta2["data_position"] == 20
  mngr.close()


def test_partial_save_is_ignored(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  checkpoint.save(mngr, 5, _state(5.0), {"step": 5, "data_position": 5})
  mngr.wait_until_finished()
  mngr.close()
  # A save interrupted mid-write leaves only a temporary folder behind.
  (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir()
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  assert mngr.latest_step() == 5


def test_no_checkpoint_is_a_clear_error(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*train first"):
    checkpoint.latest_step_or_raise(mngr)


def test_restore_params_only(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpoint.save(mngr, step, _state(float(step)), {"step": step})
  mngr.wait_until_finished()
  mngr.close()
  workdir = str(tmp_path)
  abstract = jax.eval_shape(lambda: _state(0.0).params)
  ema, step = checkpoint.restore_params(workdir, abstract)
  assert step == 2
  np.testing.assert_array_equal(ema["w"], 1.0)  # EMA = params / 2 here
  raw, _ = checkpoint.restore_params(workdir, abstract, step=1,
                                   use_ema=False)
  np.testing.assert_array_equal(raw["w"], 1.0)
  np.testing.assert_array_equal(raw["b"], [1.0, 2.0])
  with pytest.raises(FileNotFoundError, match="step 7 .*available steps: \\[1, 2\\]"):
    checkpoint.restore_params(workdir, abstract, step=7)
