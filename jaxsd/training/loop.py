"""The training loop: steps, then the periodic chores due after them.

`run_loop` calls the jitted step (a pure function of (state, batch, rng))
and, after the steps they are due at, the `Chore`s: small host-side
callables (log, checkpoint, sample grid, evaluation). `LogProgress` and
`SaveCheckpoint` serve every task; a task adds its own chores.
"""
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from jaxsd import parallel
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.data import pipeline as data_pipeline
from jaxsd.tracking import memory
from jaxsd.training import preemption as preemption_lib
from jaxsd.training import progress as progress_lib
from jaxsd.training import session
from jaxsd.training import state as ts


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass(frozen=True)
class RunKeys:
  """The run's random keys, all derived from training.seed."""
  init: Any  # parameter initialisation
  train: Any  # the step folds in its step number
  sample: Any  # periodic sample grids fold in the step
  eval: Any  # periodic evaluation folds in the step

  @classmethod
  def from_seed(cls, seed: int) -> "RunKeys":
    init, train, sample = jax.random.split(jax.random.key(seed), 3)
    return cls(init=init, train=train, sample=sample,
               eval=jax.random.fold_in(sample, 1 << 20))


# --- The periodic chores ------------------------------------------------------


@dataclasses.dataclass
class LoopState:
  """What the chores see after a call of the step."""
  step: int
  state: Any
  last: bool  # the final step of the run
  preempted: bool
  # (step, {name: value}) of every step since the last chore ran.
  metrics: List[Tuple[int, Dict[str, float]]] = dataclasses.field(
      default_factory=list)
  _sampling_params: Any = None

  # trained params -> the weights sampling uses (a LoRA run's merge).
  to_inference: Optional[Callable[[Any], Any]] = None

  def sampling_params(self, config, mesh):
    """EMA (or raw) parameters, replicated (gathered once under FSDP); a
    LoRA run's merged into its base."""
    if self._sampling_params is None:
      params = (self.state.ema_params if config.sampling.use_ema
                else self.state.params)
      params = parallel.gather_replicated(params, mesh)
      self._sampling_params = (self.to_inference(params) if self.to_inference
                               else params)
    return self._sampling_params


class Chore:
  """Runs every `every` steps and after the last one. An interruptible
  chore (sampling, evaluation) is cut short by a SIGTERM."""
  interruptible = False

  def __init__(self, every: int):
    self.every = every

  def due(self, loop: LoopState) -> bool:
    return loop.step % self.every == 0 or loop.last

  def __call__(self, loop: LoopState):
    raise NotImplementedError


class LogProgress(Chore):
  """train/* scalars (each of the step's `metric_names` averaged over the
  steps since the last line, the last grad norm, the learning rate),
  system/* and data/skipped, and one console line (process 0); stops the
  run when too many images did not decode (every process).

  `console_extra(scalars)`: text a task appends to the console line.
  """

  def __init__(self, config, writer, loader, progress: progress_lib.Progress,
               metric_names: Sequence[str] = ("loss",),
               console_extra: Optional[Callable[[Dict[str, float]], str]] = None):
    super().__init__(config.training.log_every)
    self.writer, self.loader, self.progress = writer, loader, progress
    self.metric_names = tuple(metric_names)
    self.console_extra = console_extra
    self.max_skipped = config.data.max_skipped_fraction
    self.lr_fn = ts.learning_rate_schedule(config.optim,
                                           config.training.num_steps)

  def __call__(self, loop: LoopState):
    data_pipeline.check_skipped(self.loader, self.max_skipped)
    if jax.process_index() != 0:
      return
    scalars = {f"train/{name}": float(np.mean([m[name] for _, m in
                                               loop.metrics]))
               for name in self.metric_names}
    scalars.update({
        "train/grad_norm": loop.metrics[-1][1]["grad_norm"],
        "train/learning_rate": float(self.lr_fn(loop.step - 1)),
        "system/memory_gb": memory.memory_gb(),
        "system/peak_memory_gb": memory.peak_memory_gb(),
        "data/skipped": self.loader.statistics()["skipped"],
        **self.progress.update(loop.step)})
    self.writer.write_scalars(loop.step, scalars)
    extra = self.console_extra(scalars) if self.console_extra else None
    line = self.progress.line(loop.step, scalars)
    logging.info(f"{line} {extra}" if extra else line)


class SaveCheckpoint(Chore):
  """The state, the loader's position, the training time, the config and
  the run's kind; also when preempted. `meta(loop)`: what the task adds
  (fingerprints, an autoencoder's measured scaling factor)."""

  def __init__(self, config, mngr, loader, progress: progress_lib.Progress,
               kind: str,
               meta: Optional[Callable[[LoopState], Dict[str, Any]]] = None):
    super().__init__(config.training.checkpoint_every)
    self.config, self.mngr, self.loader = config, mngr, loader
    self.progress, self.kind, self.meta = progress, kind, meta

  def due(self, loop: LoopState) -> bool:
    return super().due(loop) or loop.preempted

  def __call__(self, loop: LoopState):
    checkpoint.save(self.mngr, loop.step, loop.state, {
        "step": loop.step, "run_kind": self.kind,
        **data_pipeline.checkpoint_state(self.loader),
        "train_seconds": self.progress.train_seconds,
        "rng_seed": self.config.training.seed,
        "config": self.config.to_dict(),
        **(self.meta(loop) if self.meta is not None else {})})


# --- The loop -----------------------------------------------------------------


def _check_finite(fetched: List[Tuple[int, Dict[str, Any]]]):
  for step, metrics in fetched:
    for name, value in metrics.items():
      if not np.isfinite(value):
        raise NonFiniteLossError(
            f"train/{name} became {value} at step {step}; stopping without "
            "checkpointing this state. The last good checkpoint is kept: lower "
            "optim.learning_rate or enable optim.grad_clip_norm and resume.")


def _fetch_metrics(pending_device) -> List[Tuple[int, Dict[str, float]]]:
  """Device metrics (possibly [steps_per_call]-stacked) -> per-step floats."""
  out = []
  for first_step, metrics in jax.device_get(pending_device):
    values = {k: np.atleast_1d(v) for k, v in metrics.items()}
    for i in range(len(next(iter(values.values())))):
      out.append((first_step + i, {k: float(v[i]) for k, v in values.items()}))
  return out


def run_loop(*, state, start_step: int, num_steps: int, steps_per_call: int,
             next_batch: Callable[[], Any], train_step, train_key,
             chores: List[Chore], save: Chore, progress, preemption: preemption_lib.Preemption,
             status: session.RunStatus, to_inference=None, hooks=()):
  """The steps and their chores from start_step to num_steps, or until a
  SIGTERM (then with a checkpoint of the newest state). Returns the final
  state."""
  pending = []  # (first step, device metrics) not yet fetched
  running = None  # the previous call's metrics, maybe still computing
  step = start_step
  while step < num_steps:
    wait_start = time.perf_counter()
    batch = next_batch()
    progress.add_data_wait(time.perf_counter() - wait_start)
    state, metrics = train_step(state, batch, train_key)
    # At most one call queued behind the one running. Dispatch is
    # asynchronous: unbounded, the host ran up to log_every steps ahead of
    # the device, each holding its batch, and a SIGTERM was honoured only
    # once all of them had run (43 steps, 4.4 minutes at 6 s a step on a
    # CPU: past any scheduler's grace period). The next batch still loads
    # while this call runs.
    if running is not None:
      jax.block_until_ready(running)
    running = metrics
    preemption.unsaved = True
    pending.append((step + 1, metrics))
    step += steps_per_call
    for hook in hooks:  # e.g. tests' SIGTERM at a chosen step
      hook(step)
    loop = LoopState(step=step, state=state, last=step >= num_steps,
                     preempted=preemption.reached(step),
                     to_inference=to_inference)
    if loop.preempted:
      preemption.stopping = True
    # A preempted run checkpoints and goes: no sample grid, no evaluation.
    due = [chore for chore in chores if chore.due(loop)
           and not (loop.preempted and chore.interruptible)]
    if due:
      loop.metrics, pending = _fetch_metrics(pending), []
      _check_finite(loop.metrics)
      for chore in due:
        if chore.interruptible:
          with preemption.save_while(lambda: save(loop)):
            chore(loop)
        else:
          chore(loop)
        if chore is save:
          preemption.unsaved = False
    if (not loop.preempted and jax.process_count() == 1
        and preemption.requested):  # during this step's chores
      loop.preempted = preemption.stopping = True
      if preemption.unsaved:
        save(loop)
        preemption.unsaved = False
    if loop.preempted:
      status.value = "KILLED"
      if not loop.last:
        logging.warning("Stopped at step %d (%s); the next start resumes "
                        "here.", step, preemption.signal_name or "preempted")
        break
  preemption.stopping = True
  return state
