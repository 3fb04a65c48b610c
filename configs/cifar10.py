"""CIFAR-10 at 32x32, captioned "a photograph of a {label_name}".

tensorflow-datasets' cifar10 (downloaded on first use; offline, prepare it
in TFDS_DATA_DIR first). The MNIST recipe's UNet in RGB, with the digit
prompt replaced by the class name.

Run: python -m jaxsd.main --config=configs/cifar10.py --workdir=runs/cifar10
"""
from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.split = "train"
  config.data.caption_template = "a photograph of a {label_name}"
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.random_flip = True

  config.text.max_length = 10  # "a photograph of a automobile" + BOS/EOS

  config.model.in_channels = 3
  config.model.out_channels = 3
  config.model.block_out_channels = (64, 128, 128)  # 32 -> 16 -> 8

  config.training.batch_size = 64
  config.training.num_steps = 20_000
  config.training.eval_every = 2000
  config.training.checkpoint_every = 2000

  config.sampling.prompts = tuple(
      f"a photograph of a {name}" for name in (
          "airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
          "horse", "ship", "truck"))
  config.eval.metrics = ("fid_inception", "clip_score", "val_loss")
  return config
