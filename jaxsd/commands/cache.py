"""Encode a dataset once into a latent cache for latent diffusion runs.

jaxsd-cache --config=configs/mnist_latent.py --out=DIR \
    [--config.model.autoencoder=...] [--batch_size=64] [--shard_size=4096] \
    [--text_embeddings=auto|true|false] [--embedding_dtype=float32|float16]

Reads the config's data (data.*) in index order, transforms every image as
training does (centre crop; random crops and flips are refused: the cache
holds one encoding per image), encodes it with the frozen model.autoencoder
and writes the posterior (mean, logvar) and the captions as shards
(jaxsd/data/latent_cache.py), then cache.json. Train from it with
`--config.data.latent_cache=DIR`: the loader reads the cache instead of the
images, in the same order, and the step samples the posterior as before.
One process; rerunning overwrites DIR's shards.

With a frozen pretrained text encoder (text.pretrained set, text.trainable
False; --text_embeddings=auto does it then, true insists) the cache also
holds the captions' text embeddings, one per distinct caption of a shard;
a run with the same text encoder reads them instead of encoding captions
every step. float16 halves their size (SD's 77x768 context: 118 KB
instead of 236 KB per caption) at a rounding of the context.
"""
from absl import app
from absl import flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  cli.define_config_file_flag(
      "config", "The training configuration whose data and "
      "model.autoencoder to cache.")
  flags.adopt_module_key_flags(cli)  # --help lists --config as this command's
  flags.DEFINE_string("out", None, "The cache folder (created).")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
  flags.DEFINE_integer("shard_size", 4096, "Examples per shard.")
  flags.DEFINE_enum("text_embeddings", "auto", ["auto", "true", "false"],
                    "Store the captions' text embeddings: auto = when the "
                    "text encoder is pretrained and frozen.")
  flags.DEFINE_enum("embedding_dtype", "float32", ["float32", "float16"],
                    "dtype of the stored text embeddings.")
  flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxsd.autoencoder import latent_cache  # pylint: disable=g-import-not-at-top
  latent_cache.write_cache(FLAGS.config, FLAGS.out, FLAGS.batch_size,
                           FLAGS.shard_size, FLAGS.text_embeddings,
                           FLAGS.embedding_dtype)


def run():
  """The `jaxsd-cache` command."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
