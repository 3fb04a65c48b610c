"""Progress: rate, ETA and training time that leaves evaluation out."""
import pytest

from jaxsd import metric_logging


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_excludes_evaluation_time(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(metric_logging.time, "time", clock)
  progress = metric_logging.Progress(start_step=10, num_steps=110,
                                     train_seconds=30.0)
  clock.now += 20.0  # 20 steps of training ...
  with progress.excluded():
    clock.now += 100.0  # ... an evaluation ...
  clock.now += 20.0  # ... 20 more steps
  assert progress.train_seconds == pytest.approx(70.0)
  out = progress.update(50)
  assert out["system/steps_per_second"] == pytest.approx(1.0)
  assert out["system/train_seconds"] == pytest.approx(70.0)
  assert out["system/eta_seconds"] == pytest.approx(60.0)
  assert out["system/progress_percent"] == pytest.approx(100 * 50 / 110)
  clock.now += 5.0
  assert progress.train_seconds == pytest.approx(75.0)
