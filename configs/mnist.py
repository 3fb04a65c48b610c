"""MNIST: a small UNet conditioned on "a photograph of the number {d}".

The recipe was chosen from measured runs on 2 CPU cores (docs/mnist_results.md):
trains in 16 minutes there.

Run: python -m jaxsd.main --config=configs/mnist.py --workdir=runs/mnist
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.image_size = 28

  config.text.max_length = 8  # "a photograph of the number 7" + BOS/EOS
  config.text.hidden_size = 64
  config.text.num_layers = 2
  config.text.num_heads = 4
  config.text.intermediate_size = 256

  config.model.block_out_channels = (32, 64, 64)
  config.model.layers_per_block = 1
  config.model.attention_head_dim = 8
  config.model.norm_num_groups = 32
  # Cross-attention at 7x7 (and the mid block) only: attention at 14x14 cost
  # 1.5x the step time for no measured gain in prompt accuracy.
  config.model.down_block_types = ("DownBlock2D", "DownBlock2D",
                                   "CrossAttnDownBlock2D")
  config.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D",
                                 "UpBlock2D")
  # The prompt also reaches every resnet through the time embedding; with
  # "flatten" the digit token has its own weights (2.5x the prompt accuracy
  # of "mean" pooling over 16 tokens after 800 steps).
  config.model.pooled_text_embedding = "flatten"

  config.diffusion.schedule = "cosine"
  # v-prediction: clean backgrounds and a loss that weights the high-noise
  # steps, where the digit's identity is decided (epsilon: grey backgrounds
  # and 9% prompt accuracy after the same time).
  config.diffusion.prediction_type = "v_prediction"
  config.diffusion.timestep_sampling = "uniform"  # logit-normal: 0.40 vs 0.69

  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.998

  config.training.batch_size = 32
  config.training.num_steps = 2800  # 16 minutes at ~3.1 steps/s on 2 cores
  config.training.log_every = 50
  config.training.eval_every = 700
  config.training.checkpoint_every = 700

  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 12
  config.sampling.guidance_scale = 3.0
  # Guidance between 20% and 80% of the diffusion time only: at the
  # noisiest steps it costs diversity (and FID), at the cleanest it does
  # nothing for the prompt (docs/mnist_results.md).
  config.sampling.guidance_interval = (0.2, 0.8)
  config.eval.num_samples = 500  # periodic; the headline uses jaxsd.evaluate
  config.eval.chunk_size = 250
  return config
