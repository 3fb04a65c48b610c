"""run_loop keeps the host at most one call ahead of the device, so a stop
signal is honoured at the next step, not after a queue of dispatched ones."""
import numpy as np

from jaxsd.training import loop as loop_lib
from jaxsd.training import preemption as preemption_lib
from jaxsd.training import session


class _Running:
  """A step's output that records when the loop waits for it."""

  def __init__(self, step, events):
    self.step, self.events = step, events

  def block_until_ready(self):
    self.events.append(("wait", self.step))
    return self

  def __array__(self, dtype=None, copy=None):
    return np.asarray(float(self.step), dtype)


class _Save(loop_lib.Chore):

  def __init__(self, events):
    super().__init__(every=1000)
    self.events = events

  def due(self, loop):  # as SaveCheckpoint: also when preempted
    return super().due(loop) or loop.preempted

  def __call__(self, loop):
    self.events.append(("save", loop.step))


class _Progress:

  def add_data_wait(self, seconds):
    del seconds


def test_host_waits_for_the_previous_call_and_stops_at_the_signal_step():
  events = []

  def train_step(state, batch, key):
    del batch, key
    events.append(("dispatch", state + 1))
    return state + 1, {"loss": _Running(state + 1, events)}

  preemption = preemption_lib.Preemption()
  try:
    def stop_at_5(step):
      if step == 5:
        preemption._handler(15, None)  # what SIGTERM calls  # pylint: disable=protected-access
    save = _Save(events)
    final = loop_lib.run_loop(
        state=0, start_step=0, num_steps=100, steps_per_call=1,
        next_batch=lambda: None, train_step=train_step, train_key=None,
        chores=[save], save=save, progress=_Progress(),
        preemption=preemption, status=session.RunStatus(), hooks=[stop_at_5])
  finally:
    preemption.restore()
  assert final == 5
  # Step n+1 is dispatched only after the loop waited for step n-1.
  dispatched = [s for kind, s in events if kind == "dispatch"]
  for n in dispatched[2:]:
    assert events.index(("wait", n - 2)) < events.index(("dispatch", n))
  assert dispatched == [1, 2, 3, 4, 5]
  assert events[-1] == ("save", 5)
