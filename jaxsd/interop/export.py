"""A jaxsd run exported for PyTorch's diffusers (what `jaxsd-export` runs).

- A full run (latent diffusion): `out` becomes a diffusers pipeline folder
  (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
  safetensors weights) that `StableDiffusionPipeline.from_pretrained(out)`
  loads (jaxsd/interop/sd_pipeline.py writes it).
- A LoRA run (model.lora.rank > 0): a folder holding only
  `pytorch_lora_weights.safetensors`, the adapters as diffusers'
  `load_lora_weights(out)` reads them (jaxsd/interop/lora_format.py); with
  merge_lora the full pipeline, the adapters merged at lora_scale.

Export deletes nothing it did not write. `check_out` refuses an `out` that
is, holds or sits inside a jaxsd run, that holds an input of the run, or
that holds anything but a previous export; overwrite replaces only a
previous export. Both kinds are written to a new folder beside `out` and
renamed into place, so `out` is complete or as it was.
"""
import os
import shutil
import tempfile
from typing import Iterator, Optional

from absl import logging

from jaxsd.errors import ConfigError
from jaxsd.errors import OutputExistsError
from jaxsd.interop import lora_format
from jaxsd.interop import sd_pipeline

# What marks a folder as a jaxsd run: a diffusion run's checkpoints/,
# config.json and train.lock (jaxsd/training/), an autoencoder run's
# autoencoder.json.
RUN_MARKERS = ("checkpoints", "config.json", "train.lock", "autoencoder.json")
# The top-level entries of each kind of export.
PIPELINE_ENTRIES = frozenset((sd_pipeline.MODEL_INDEX, *sd_pipeline.PARTS))
LORA_ENTRIES = frozenset((lora_format.WEIGHT_NAME,))
# The config fields naming a run's inputs on disk, which export never
# replaces.
_INPUT_KEYS = ("model.pretrained_pipeline", "model.pretrained",
               "model.autoencoder", "text.pretrained", "text.tokenizer")


def is_run(path: str) -> bool:
  """Whether the folder `path` is a jaxsd run (holds one of RUN_MARKERS)."""
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, m)) for m in RUN_MARKERS)


def _marker(path: str) -> str:
  """The first of RUN_MARKERS in the run `path`."""
  return next(m for m in RUN_MARKERS if os.path.exists(os.path.join(path, m)))


def previous_export(path: str) -> Optional[str]:
  """"pipeline" or "lora" when the folder holds exactly an export of that
  kind (a pipeline: model_index.json among its parts; LoRA: the weight file
  alone), else None."""
  entries = set(os.listdir(path))
  if sd_pipeline.MODEL_INDEX in entries and entries <= PIPELINE_ENTRIES:
    return "pipeline"
  if entries == LORA_ENTRIES:
    return "lora"
  return None


def _within(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies below it (both real paths)."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _ancestors(path: str) -> Iterator[str]:
  """The folders above the real path `path`, nearest first."""
  parent = os.path.dirname(path)
  while parent != path:
    yield parent
    path, parent = parent, os.path.dirname(parent)


def _runs_below(path: str, depth: int = 2) -> Iterator[str]:
  """Runs among the folders up to `depth` levels below `path`."""
  if depth == 0:
    return
  for entry in sorted(os.listdir(path)):
    child = os.path.join(path, entry)
    if os.path.isdir(child) and not os.path.islink(child):
      if is_run(child):
        yield child
      else:
        yield from _runs_below(child, depth - 1)


def check_out(out: str, *, overwrite: bool = False,
              workdir: Optional[str] = None, config=None) -> Optional[str]:
  """Whether export may write `out`; raises a one-line error if not.

  Refuses (ConfigError) an `out` that is a file or a link, is or holds one
  of the run's inputs (config's model.pretrained_pipeline, ...), is or
  holds a jaxsd run (`workdir`, the run exported, at any depth; other runs
  two levels down), sits inside one, or holds anything but a previous
  export;
  and (OutputExistsError) a previous export without `overwrite`.
  Returns the kind of the previous export that writing `out` replaces
  ("pipeline" or "lora"), or None when `out` is absent or empty.
  """
  if os.path.islink(os.path.abspath(out)):
    raise ConfigError(f"--out={out} is a symbolic link; give the folder "
                      "itself.")
  real = os.path.realpath(out)
  if os.path.exists(real) and not os.path.isdir(real):
    raise ConfigError(f"--out={out} is a file; give a folder for the export.")
  for key in _INPUT_KEYS if config is not None else ():
    section, field = key.split(".")
    value = config[section].get(field) or ""
    if (isinstance(value, str) and value and os.path.exists(value)
        and _within(os.path.realpath(value), real)):
      raise ConfigError(f"--out={out} holds the run's {key}={value}; export "
                        "to a new folder.")
  if is_run(real):
    raise ConfigError(f"--out={out} is a jaxsd run (it holds "
                      f"{_marker(real)}); export to a new folder outside it.")
  for folder in _ancestors(real):
    if is_run(folder):
      raise ConfigError(f"--out={out} is inside the jaxsd run {folder} (it "
                        f"holds {_marker(folder)}); export to a new folder "
                        "outside it.")
  if workdir is not None and _within(os.path.realpath(workdir), real):
    raise ConfigError(f"--out={out} holds the run being exported "
                      f"({workdir}); export to a new folder outside it.")
  if not os.path.isdir(real) or not os.listdir(real):
    return None
  kind = previous_export(real)
  if kind is None:
    run = next(_runs_below(real), None)
    if run is not None:
      raise ConfigError(f"--out={out} holds the jaxsd run {run}; export to a "
                        "new folder outside it.")
    foreign = sorted(set(os.listdir(real)) - PIPELINE_ENTRIES - LORA_ENTRIES)
    raise ConfigError(
        f"--out={out} holds files that are not a jaxsd export "
        f"({', '.join((foreign or sorted(os.listdir(real)))[:3])}); export to "
        "a new or empty folder (--overwrite replaces only a previous "
        "export).")
  if not overwrite:
    raise OutputExistsError(f"--out={out} holds a previous export; pass "
                            "--overwrite to replace it, or choose another "
                            "--out.")
  return kind


def _replace(out: str, written: str):
  """Moves the folder `written` to `out`, removing what `out` held (a
  previous export, by check_out)."""
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.replace(written, out)


def export(workdir: str, out: str, *, step=None, use_ema: bool = True,
           merge_lora: bool = False, lora_scale: float = 1.0,
           overwrite: bool = False) -> str:
  """Writes the run's export to `out` (see the module docstring); returns
  the path written (the folder, or a LoRA run's weight file).

  `out` is checked (`check_out`) before the run is read, against the run's
  config before anything is restored, and again just before it is
  replaced.
  """
  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel
  from jaxsd.checkpointing import run_config
  from jaxsd.diffusion import setup as build
  from jaxsd.models import lora as lora_lib
  # pylint: enable=g-import-not-at-top
  check_out(out, overwrite=overwrite, workdir=workdir)  # before any reading
  config = run_config.load_run_config(workdir)
  check_out(out, overwrite=overwrite, workdir=workdir, config=config)
  is_lora = lora_lib.from_config(config.model.get("lora")) is not None
  adapters_only = is_lora and not merge_lora
  mesh = parallel.make_mesh()
  config, comps, params, step = build.restore_for_inference(
      workdir, mesh, step=step, use_ema=use_ema, lora_scale=lora_scale,
      merge_lora=not adapters_only)
  # Written into a new folder beside out, then renamed onto it.
  target = os.path.abspath(out)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-",
                         dir=os.path.dirname(target))
  written = os.path.join(tmp, "export")  # mkdtemp's 0700 stays on tmp
  try:
    if adapters_only:
      lora_format.save_diffusers_lora(
          written, unet_adapters=sd_pipeline.host_arrays(params["unet"]),
          text_adapters=(sd_pipeline.host_arrays(params["text"])
                         if params["text"] else None),
          alpha=comps.lora.alpha)
    else:
      sd_pipeline.write(written, config, comps, params)
    check_out(out, overwrite=overwrite, workdir=workdir, config=config)
    _replace(target, written)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # made by mkdtemp above
  if adapters_only:
    path = os.path.join(out, lora_format.WEIGHT_NAME)
    logging.info("Wrote the LoRA adapters of step %d to %s; in diffusers: "
                 "StableDiffusionPipeline.from_pretrained(%r)"
                 ".load_lora_weights(%r).", step, path,
                 config.model.pretrained_pipeline or "BASE", out)
    return path
  logging.info("Wrote a diffusers pipeline of step %d to %s.", step, out)
  return out
