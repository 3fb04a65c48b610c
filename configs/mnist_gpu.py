"""MNIST on a GPU: a wider, deeper UNet and text encoder, bigger batches.

The recipe of configs/mnist.py (v-prediction, pooled text path, DPM-Solver++)
scaled for an accelerator: attention at 14x14 and 7x7, two layers per block,
bf16 compute with f32 master weights, batch 256.

Run: python -m jaxsd.main --config=configs/mnist_gpu.py --workdir=runs/mnist_gpu
Not yet timed on a GPU (none was available to the developers); see
docs/mnist_results.md.
"""
from configs import mnist


def get_config():
  config = mnist.get_config()

  config.text.hidden_size = 256
  config.text.num_layers = 4
  config.text.num_heads = 4
  config.text.intermediate_size = 1024

  config.model.block_out_channels = (64, 128, 256)
  config.model.layers_per_block = 2
  config.model.attention_head_dim = 4
  config.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D")
  config.model.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                 "UpBlock2D")
  config.model.dtype = "bfloat16"

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 500
  config.optim.ema_decay = 0.9995

  config.training.batch_size = 256
  config.training.num_steps = 20_000
  # steps_per_call > 1 (several steps per jitted call) is untimed on GPUs
  # (benchmarks/README.md); measure before raising.
  config.training.steps_per_call = 1
  config.training.log_every = 200
  config.training.eval_every = 5000
  config.training.checkpoint_every = 2000

  config.sampling.num_steps = 25
  config.sampling.chunk_size = 500
  config.eval.chunk_size = 1000
  return config
