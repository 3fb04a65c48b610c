"""A tiny model for tests and smoke runs: seconds per step on a CPU."""
from configs import mnist


def get_config():
  config = mnist.get_config()
  config.text.max_length = 12
  config.text.hidden_size = 32
  config.text.num_layers = 1
  config.text.num_heads = 2
  config.text.intermediate_size = 64

  config.model.block_out_channels = (32, 32)
  config.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  config.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  config.model.attention_head_dim = 4
  config.model.norm_num_groups = 32

  config.diffusion.num_timesteps = 100

  config.optim.warmup_steps = 2
  config.optim.learning_rate = 1e-3
  # Adam's first updates are +-lr whatever a gradient's size, so an element
  # whose gradient is ~0 takes its sign from summation order, which differs
  # between device layouts; the multi-device tests compare parameters after
  # 4 steps, and a larger eps damps those elements.
  config.optim.eps = 1e-3
  config.training.batch_size = 8
  config.training.num_steps = 4
  config.training.log_every = 2
  config.training.eval_every = 4
  config.training.checkpoint_every = 2
  config.training.keep_checkpoints = 2

  config.eval.metrics = ("prompt_accuracy", "fid_mnist", "diversity")
  config.eval.num_samples = 20
  config.eval.chunk_size = 20

  config.sampling.num_steps = 4
  config.sampling.samples_per_prompt = 1
  config.sampling.prompts = ("a photograph of the number 0",
                             "a photograph of the number 7", "")
  return config
