"""MNIST: a small UNet conditioned on "a photograph of the number {d}".

Run: python -m jaxsd.main --config=configs/mnist.py --workdir=runs/mnist
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.image_size = 28

  config.text.max_length = 16  # captions are 8 tokens
  config.text.hidden_size = 64
  config.text.num_layers = 2
  config.text.num_heads = 4
  config.text.intermediate_size = 256

  config.model.block_out_channels = (32, 64, 64)
  config.model.layers_per_block = 1
  config.model.attention_head_dim = 8
  config.model.norm_num_groups = 32

  config.diffusion.schedule = "cosine"
  config.diffusion.prediction_type = "epsilon"

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995

  config.training.batch_size = 64
  config.training.num_steps = 10_000
  config.training.log_every = 50
  config.training.eval_every = 2000
  config.training.checkpoint_every = 2000

  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 25
  config.sampling.guidance_scale = 3.0
  return config
