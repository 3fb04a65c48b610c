"""The resume policy: which checkpoint a start resumes, what a resume may
change, damaged checkpoints, and starting from another run's weights.

- `check_resume(config, workdir, kind)`: before anything is restored or
  written, the step a start resumes from, after checking the config against
  the one that checkpoint was trained with (`check_changes`: the fields that
  shape the state must stay; the others are logged and taken).
- `restore_newest_readable(mngr, restore)`: the newest checkpoint that
  reads; a damaged one is moved aside (`<step>.corrupt`), never deleted.
- `check_run_meta`: what a checkpoint records beyond its state (an
  autoencoder's or a LoRA base's fingerprint) against this run's.
- `init_from_run(config, abstract_state, state)`: training.init_from.
"""
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
import jax

from jaxsd import errors
from jaxsd import parallel
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.checkpointing import run_config

# --- What a resume may change -------------------------------------------------

# Fields that shape the train state or fix what its numbers mean, per kind
# of run. A resume with any of them changed would fail deep inside the
# restore or silently train another model; a "." at the end means every
# field under it.
FIXED = {
    "diffusion": ("model.", "text.", "diffusion.prediction_type",
                  "diffusion.num_timesteps", "diffusion.schedule",
                  "diffusion.beta_start", "diffusion.beta_end",
                  "diffusion.rescale_zero_snr", "optim.grad_accum_steps"),
    "autoencoder": ("autoencoder.block_out_channels",
                    "autoencoder.layers_per_block",
                    "autoencoder.latent_channels",
                    "autoencoder.norm_num_groups",
                    "autoencoder.mid_block_add_attention",
                    "autoencoder.use_quant_conv",
                    "autoencoder.use_post_quant_conv",
                    "autoencoder.disc_channels", "autoencoder.disc_layers",
                    "data.num_channels", "optim.grad_accum_steps"),
}
# ...except these: where weights were first loaded from (a resume reads
# them from the checkpoint; a LoRA base and a latent run's autoencoder are
# checked by fingerprint instead), machine paths, and compute settings that
# leave the state as it is.
FREE = ("model.pretrained", "model.pretrained_pipeline", "model.autoencoder",
        "model.dtype", "model.remat", "model.lora.dropout",
        "model.lora.base_dtype", "text.pretrained", "text.tokenizer")


def _fixed(key: str, kind: str) -> bool:
  if key in FREE:
    return False
  return any(key.startswith(f) if f.endswith(".") else key == f
             for f in FIXED[kind])


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _normalised(config_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Flat {key: value} with tuples as lists, as JSON stores them."""
  return flatten(json.loads(json.dumps(config_dict, default=str)))


def _view(flat: Mapping[str, Any], key: str):
  value = flat[key]
  if key == "optim.grad_clip_norm":  # only on/off changes the state
    return bool(value and value > 0)
  return value


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any],
                   kind: str = "diffusion") -> Tuple[List[str], List[str]]:
  """(fixed keys that differ, other keys that differ), each as "key: saved
  -> new" lines. Keys new since the run started count as free."""
  saved, new = _normalised(saved), _normalised(new)
  fixed, free = [], []
  for key in sorted(set(saved) & set(new)):
    if saved[key] == new[key]:
      continue
    line = f"{key}: {saved[key]!r} -> {new[key]!r}"
    state_shaping = _fixed(key, kind) or (
        key == "optim.grad_clip_norm"
        and _view(saved, key) != _view(new, key))
    (fixed if state_shaping else free).append(line)
  return fixed, free


def check_changes(saved: Mapping[str, Any], new: Mapping[str, Any],
                  workdir: str, step: int, kind: str = "diffusion"):
  """Raises ResumeMismatchError listing the state-shaping fields the new
  config changes; logs the other changes, which a resume takes."""
  fixed, free = config_changes(saved, new, kind)
  if fixed:
    raise errors.ResumeMismatchError(
        f"{workdir} holds a run (latest checkpoint: step {step}) that a "
        f"resume cannot change in {len(fixed)} setting(s): "
        + "; ".join(fixed) + ". To resume it, keep the run's values; for a "
        "new run, give another --workdir (add --config.training.init_from="
        f"{workdir} to start it from this run's weights, where the "
        "parameter shapes stay the same).")
  for line in free:
    logging.info("Resuming with a changed setting: %s", line)


# --- Which checkpoint a start resumes ----------------------------------------


def latest_readable_meta(workdir: str) -> Optional[Tuple[int, Dict]]:
  """(step, run metadata) of the newest checkpoint whose metadata reads, or
  None without checkpoints. Reads only: nothing is moved or written."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return None
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return step, checkpoint.read_meta(mngr, step)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint of step %d in %s cannot be read (%s); "
                        "looking at the one before.", step, mngr.directory,
                        type(e).__name__)
    return None
  finally:
    mngr.close()


def _a(word: str) -> str:
  return f"a{'n' if word[0] in 'aeiou' else ''} {word}"


def run_kind(meta: Mapping[str, Any]) -> str:
  """The kind of run a checkpoint's metadata belongs to (checkpoints from
  before kinds were recorded are diffusion runs')."""
  return meta.get("run_kind") or "diffusion"


def check_kind(meta: Mapping[str, Any], kind: str, workdir: str, step: int):
  held = run_kind(meta)
  if held != kind:
    raise errors.ResumeMismatchError(
        f"{workdir} holds checkpoints of {_a(held)} run (step {step}), not "
        f"of {_a(kind)} run: give this run its own --workdir.")


def check_resume(config, workdir: str, kind: str = "diffusion"
                 ) -> Optional[int]:
  """The step a start in `workdir` resumes from (None: a new run), after
  checking `config` against the config that checkpoint was trained with
  (its saved copy; config.json for checkpoints older than that)."""
  found = latest_readable_meta(workdir)
  if found is None:
    return None
  step, meta = found
  check_kind(meta, kind, workdir, step)
  saved = meta.get("config")
  if saved is None:
    saved = run_config.read_saved_config(workdir)
  if saved is None:
    logging.warning("No saved config to check the resume against in %s.",
                    workdir)
  else:
    check_changes(saved, json.loads(config.to_json_best_effort()), workdir,
                  step, kind)
  if config.training.get("init_from"):
    logging.info("%s already holds a run (step %d): resuming it; "
                 "training.init_from=%s is ignored.", workdir, step,
                 config.training.init_from)
  return step


def check_run_meta(meta: Dict[str, Any], expected: Dict[str, Any], step: int,
                   what: Mapping[str, str]):
  """Raises ResumeMismatchError when a checkpoint's metadata differs from
  `expected` in a key both have; `what[key]` says what changed."""
  for key, value in expected.items():
    if key in meta and meta[key] != value:
      raise errors.ResumeMismatchError(
          f"The checkpoint of step {step} was trained with other "
          f"{what.get(key, key)}: {key} {meta[key]}, now {value}. Point the "
          "config at what it trained with, or start a new --workdir.")


# --- Damaged checkpoints --------------------------------------------------------


def restore_newest_readable(mngr, restore: Callable[[int], Any]):
  """restore(step) of the newest checkpoint that reads: one that does not is
  moved aside (`<step>.corrupt`, process 0) with a warning and the one
  before it tried. None without checkpoints; an error when none reads."""
  moved, first_failure = [], None
  while mngr.latest_step() is not None:
    step = mngr.latest_step()
    try:
      out, failure = restore(step), None
    except errors.JaxsdError:
      raise  # the checkpoint read, but does not belong to this config
    except Exception as e:  # pylint: disable=broad-except
      out, failure = None, e
    # Every process takes the same branch, even if only one failed to read.
    if not parallel.any_process(failure is not None):
      return out
    failure = failure or RuntimeError("unreadable on another process")
    first_failure = first_failure or failure
    moved.append(checkpoint.step_path(mngr, step) + checkpoint.CORRUPT_SUFFIX)
    if jax.process_index() == 0:
      checkpoint.set_aside(mngr, step, failure)
    parallel.any_process(False)  # the others wait for the move
    mngr.reload()
  if moved:
    # Never start over silently: that none reads may be this code's fault.
    raise errors.CheckpointError(
        f"No checkpoint in {mngr.directory} could be read; each was moved "
        f"aside ({', '.join(moved)}); the newest failed with "
        f"{type(first_failure).__name__}: {checkpoint.first_line(first_failure)}"
        ". If they were damaged, the same command now starts the run "
        "again from step 0; if this code or config cannot read them, rename "
        "them back (drop the .corrupt suffix) and resume with what wrote "
        "them.")
  return None


# --- Another run's weights ------------------------------------------------------


def init_from_run(config, abstract_state, state):
  """`state` with params (and EMA params) of training.init_from's checkpoint
  (training.init_from_step, -1: its latest); optimiser and step stay fresh.
  `abstract_state`: the state's ShapeDtypeStructs (with shardings)."""
  tcfg = config.training
  source = tcfg.init_from
  mngr = checkpoint.manager(source, read_only=True)
  try:
    step = (checkpoint.latest_step_or_raise(mngr)
            if tcfg.get("init_from_step", -1) < 0 else tcfg.init_from_step)
    if step not in mngr.all_steps():
      raise errors.ConfigError(
          f"training.init_from_step={step}: {source} has checkpoints of steps "
          f"{mngr.all_steps()}.")
    names = [n for n in ("params", "ema_params") if hasattr(state, n)]
    item = {n: getattr(abstract_state, n) for n in names}
    try:
      loaded = checkpoint.restore_partial(mngr, step, item)
    except ValueError as e:
      differ = ""
      try:
        fixed, _ = config_changes(
            checkpoint.read_meta(mngr, step).get("config") or {},
            json.loads(config.to_json_best_effort()))
        differ = "; ".join(line for line in fixed
                           if line.startswith(("model.", "text.")))
      except Exception:  # pylint: disable=broad-except
        pass
      raise errors.ConfigError(
          f"training.init_from={source}: its step {step} parameters do not fit "
          f"this config's model ({checkpoint.first_line(e)})"
          + (f"; the architectures differ in {differ}" if differ else "")
          + ". init_from needs the same parameter shapes.") from e
  finally:
    mngr.close()
  logging.info("Initialised the parameters from %s (step %d); optimiser and "
               "step start fresh.", source, step)
  return state.replace(**loaded)
