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

OUT must be new, empty, or a previous export (which --overwrite replaces):
an OUT that is, holds or sits inside a jaxsd run, holds one of the run's
inputs, or holds other files is refused, and nothing is deleted.

A run diffusers cannot represent (pixel space, model.pooled_text_embedding)
is refused with the reason (jaxsd/interop/sd_pipeline.py).
"""
from absl import app
from absl import flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir holding "
                      "checkpoints/ and config.json.")
  flags.DEFINE_string("out", None, "The folder to write: new, empty, or a "
                      "previous export.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_bool("use_ema", True, "EMA parameters (--nouse_ema: raw ones).")
  flags.DEFINE_bool("merge_lora", False, "LoRA runs: write the full pipeline "
                    "with the adapters merged, not the adapters alone.")
  flags.DEFINE_float("lora_scale", 1.0, "LoRA runs with --merge_lora: the "
                     "adapters' weight in the merge.")
  flags.DEFINE_bool("overwrite", False, "Replace a previous export in --out "
                    "(nothing else is ever replaced).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxsd.interop import export  # pylint: disable=g-import-not-at-top
  path = export.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step,
                       use_ema=FLAGS.use_ema, merge_lora=FLAGS.merge_lora,
                       lora_scale=FLAGS.lora_scale, overwrite=FLAGS.overwrite)
  print(f"Wrote {path}")


def run():
  """The `jaxsd-export` command."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
