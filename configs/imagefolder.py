"""Your own captioned images: an RGB pixel-space model at 64x64.

A folder of jpg/png/webp images with captions in metadata.jsonl /
metadata.csv (`file_name`, `text`), a .txt beside each image, or class
subfolders (data.caption_template with {label_name}). Sized to show
learning within an hour on a CPU; scale block_out_channels, batch and steps
up on a GPU.

Run: python -m jaxsd.main --config=configs/imagefolder.py \
    --workdir=runs/my_images --config.data.path=/path/to/images
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.source = "imagefolder"
  config.data.path = ""  # required: --config.data.path=DIR
  config.data.caption_template = "a photograph of a {label_name}"
  config.data.image_size = 64
  config.data.num_channels = 3
  config.data.crop = "random"
  config.data.random_flip = True
  config.data.workers = 1

  config.text.max_length = 32
  config.text.hidden_size = 128
  config.text.num_layers = 2
  config.text.num_heads = 4
  config.text.intermediate_size = 512

  config.model.in_channels = 3
  config.model.out_channels = 3
  config.model.block_out_channels = (32, 64, 128)  # 64 -> 32 -> 16
  config.model.layers_per_block = 1
  config.model.attention_head_dim = 8
  # Cross-attention at 16x16 (and the mid block) only: self-attention over
  # 32x32 or 64x64 tokens is what makes a CPU step slow.
  config.model.down_block_types = ("DownBlock2D", "DownBlock2D",
                                   "CrossAttnDownBlock2D")
  config.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D",
                                 "UpBlock2D")
  config.model.pooled_text_embedding = "mean"

  config.diffusion.schedule = "cosine"
  config.diffusion.prediction_type = "v_prediction"

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999

  config.training.batch_size = 16
  config.training.num_steps = 10_000
  config.training.log_every = 50
  config.training.eval_every = 1000
  config.training.checkpoint_every = 1000

  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 20
  config.sampling.guidance_scale = 3.0
  config.sampling.prompts = ()  # () = the first captions of the data
  config.sampling.samples_per_prompt = 2
  config.eval.metrics = ("fid_inception", "clip_score")
  config.eval.num_samples = 500
  return config
