"""MNIST as latent diffusion: jaxsd's own autoencoder, then a UNet on its
latents, judged by the same MNIST metrics as configs/mnist.py.

MNIST's 28x28 digits are padded to 32x32 and encoded 4x smaller, to 8x8x4
latents (256 numbers for 1024 pixels). Two runs:

  # 1. the autoencoder (config string "autoencoder")
  jaxsd-train-autoencoder \
      --config=configs/mnist_latent.py:autoencoder --workdir=runs/mnist_ae
  # 2. latent diffusion on its latents (model.autoencoder names run 1)
  python -m jaxsd.main --config=configs/mnist_latent.py \
      --workdir=runs/mnist_latent [--config.model.autoencoder=runs/mnist_ae]

Optionally encode the data once (jaxsd-cache
--config=configs/mnist_latent.py --out=runs/mnist_latents) and train with
--config.data.latent_cache=runs/mnist_latents. Measured time and quality
against pixel-space configs/mnist.py: docs/mnist_latent.md.
"""
from configs import mnist


def get_config(kind: str = "diffusion"):
  if kind not in ("diffusion", "autoencoder"):
    raise ValueError(f"configs/mnist_latent.py:{kind}: choose "
                     "configs/mnist_latent.py (diffusion) or "
                     "configs/mnist_latent.py:autoencoder.")
  config = mnist.get_config()
  config.data.image_size = 32  # 28x28 padded; divides by the 4x downsampling

  ae = config.autoencoder
  ae.block_out_channels = (32, 64, 64)  # 32 -> 16 -> 8
  ae.layers_per_block = 1
  ae.latent_channels = 4
  ae.norm_num_groups = 32
  ae.mid_block_add_attention = True
  ae.reconstruction_loss = "l1"
  ae.kl_weight = 1e-6
  ae.disc_start = -1  # digits need no adversarial sharpening
  ae.scaling_factor = 0.0  # measured: 1 / std of the latents
  ae.eval_images = 500

  if kind == "autoencoder":
    config.training.batch_size = 64
    config.training.num_steps = 1500
    config.training.log_every = 100
    config.training.eval_every = 500
    config.training.checkpoint_every = 500
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.eval.metrics = ()
    return config

  config.model.autoencoder = "runs/mnist_ae"
  config.model.in_channels = config.model.out_channels = ae.latent_channels
  # 8x8 latents: the UNet's levels are 8, 4 and 2; wider than the pixel
  # model's (32, 64, 64) for the same steps, at a fraction of its cost per
  # step, with cross-attention at 4x4 and 2x2.
  config.model.block_out_channels = (64, 128, 128)
  config.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D")
  config.model.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                 "UpBlock2D")
  return config
