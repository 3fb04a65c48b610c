"""Export a jaxsd run for PyTorch's diffusers.

jaxsd-export --workdir=runs/sd_finetune --out=exported \
    [--step=N] [--nouse_ema] [--merge_lora] [--lora_scale=1.0] [--overwrite]

- A full run (latent diffusion): OUT becomes a diffusers pipeline folder
  (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
  safetensors weights) that `StableDiffusionPipeline.from_pretrained(OUT)`
  loads; its scheduler is DDIM with the run's schedule and spacing.
- A LoRA run (model.lora.rank > 0): OUT/pytorch_lora_weights.safetensors,
  the adapters as `pipeline.load_lora_weights(OUT)` reads them, to load
  into the run's base (model.pretrained_pipeline); --merge_lora writes the
  full pipeline with the adapters merged at --lora_scale instead.

A run diffusers cannot represent (pixel space, model.pooled_text_embedding)
is refused with the reason (jaxsd/sd_pipeline.py).
"""
import os

from absl import app
from absl import flags
from absl import logging

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir holding "
                      "checkpoints/ and config.json.")
  flags.DEFINE_string("out", None, "The folder to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_bool("use_ema", True, "EMA parameters (--nouse_ema: raw ones).")
  flags.DEFINE_bool("merge_lora", False, "LoRA runs: write the full pipeline "
                    "with the adapters merged, not the adapters alone.")
  flags.DEFINE_float("lora_scale", 1.0, "LoRA runs with --merge_lora: the "
                     "adapters' weight in the merge.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, *, step=None, use_ema: bool = True,
           merge_lora: bool = False, lora_scale: float = 1.0,
           overwrite: bool = False) -> str:
  """Writes the run's export to `out` (see the module docstring); returns
  the path written (the folder, or a LoRA run's weight file)."""
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  from jaxsd.interop import sd_pipeline  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  config = build.load_run_config(workdir)
  is_lora = lora_lib.from_config(config.model.get("lora")) is not None
  adapters_only = is_lora and not merge_lora
  config, comps, params, step = build.restore_for_inference(
      workdir, mesh, step=step, use_ema=use_ema, lora_scale=lora_scale,
      merge_lora=not adapters_only)
  if adapters_only:
    path = os.path.join(out, lora_lib.WEIGHT_NAME)
    if os.path.exists(path) and not overwrite:
      raise FileExistsError(f"{path} exists; choose another --out or pass "
                            "--overwrite.")
    os.makedirs(out, exist_ok=True)
    lora_lib.save_diffusers_lora(
        out, unet_adapters=sd_pipeline.host_arrays(params["unet"]),
        text_adapters=(sd_pipeline.host_arrays(params["text"])
                       if params["text"] else None),
        alpha=comps.lora.alpha)
    logging.info("Wrote the LoRA adapters of step %d to %s; in diffusers: "
                 "StableDiffusionPipeline.from_pretrained(%r)"
                 ".load_lora_weights(%r).", step, path,
                 config.model.pretrained_pipeline or "BASE", out)
    return path
  sd_pipeline.write(out, config, comps, params, overwrite=overwrite)
  logging.info("Wrote a diffusers pipeline of step %d to %s.", step, out)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path = export(FLAGS.workdir, FLAGS.out, step=FLAGS.step,
                use_ema=FLAGS.use_ema, merge_lora=FLAGS.merge_lora,
                lora_scale=FLAGS.lora_scale, overwrite=FLAGS.overwrite)
  print(f"Wrote {path}")


def run():
  """The `jaxsd-export` command (`jaxsd-export`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
