"""Fine-tune a pretrained Stable Diffusion (a diffusers pipeline folder) on
any jaxsd data source, fully or with LoRA; 512 px, for GPUs.

  # the pipeline, once (any SD 1.x / 2.x diffusers folder with PyTorch
  # weights; safetensors are read first, a .bin only weights-only):
  huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --local-dir pretrained/stable-diffusion-v1-5 \
      --include "*.json" "*.txt" "*/*.safetensors"
  # full fine-tune (UNet; the text encoder stays frozen):
  python -m jaxsd.main --config=configs/sd_finetune.py --workdir=runs/sd_ft \
      --config.data.source=imagefolder --config.data.path=/data/my_images
  # LoRA on the UNet's attention projections (config string "lora"):
  python -m jaxsd.main --config=configs/sd_finetune.py:lora \
      --workdir=runs/sd_lora --config.data.path=...
  # into PyTorch's diffusers:
  jaxsd-export --workdir=runs/sd_lora --out=exported_lora

model.pretrained_pipeline sets the architecture, the autoencoder, the text
encoder, the tokenizer, the schedule and the DDIM settings from the folder
(jaxsd/interop/sd_pipeline.py); the fields below are the training recipe.
Memory: bf16 compute with f32 master weights and gradient checkpointing of
the UNet's blocks (benchmarks/README.md has the measured figures).
"""
from configs import default


def get_config(kind: str = "full"):
  if kind not in ("full", "lora"):
    raise ValueError(f"configs/sd_finetune.py:{kind}: choose "
                     "configs/sd_finetune.py (full) or "
                     "configs/sd_finetune.py:lora.")
  config = default.get_config()
  pipeline = "pretrained/stable-diffusion-v1-5"
  model = config.model
  model.pretrained_pipeline = pipeline
  # What the pipeline sets (SD 1.5's), so the config reads and validates as
  # the run it describes.
  model.autoencoder = pipeline  # its vae/
  model.in_channels = model.out_channels = 4
  model.block_out_channels = (320, 640, 1280, 1280)
  model.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  model.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  model.layers_per_block = 2
  model.attention_head_dim = 8
  config.text.max_length = 77
  config.diffusion.schedule = "scaled_linear"
  model.dtype = "bfloat16"  # compute; master weights stay f32
  model.remat = "blocks"
  model.pooled_text_embedding = ""

  data = config.data
  data.source = "imagefolder"
  # Kept from the old MNIST-valued default so this file's run is unchanged;
  # it captions class subfolders only (data.path/<class>/...), where
  # "{label_name}" (the folder's name) is likely what you want.
  data.caption_template = "a photograph of the number {label}"
  data.image_size = 512  # SD 1.x's resolution: 64x64 latents
  data.num_channels = 3
  data.crop = "center"
  data.random_flip = True
  data.workers = 4

  config.text.trainable = False  # as diffusers' train_text_to_image

  config.diffusion.cfg_dropout = 0.1
  config.diffusion.min_snr_gamma = 5.0  # Hang et al. 2023; diffusers' option

  optim = config.optim
  optim.learning_rate = 1e-5
  optim.warmup_steps = 500
  optim.weight_decay = 1e-2
  optim.grad_clip_norm = 1.0
  optim.ema_decay = 0.9999

  training = config.training
  training.batch_size = 16  # global; raise optim.grad_accum_steps if needed
  training.num_steps = 15_000
  training.log_every = 50
  training.checkpoint_every = 1000
  training.eval_every = 5000
  training.keep_checkpoints = 2

  sampling = config.sampling
  sampling.num_steps = 50
  sampling.guidance_scale = 7.5
  sampling.prompts = ()  # the first captions of the data
  sampling.samples_per_prompt = 1
  sampling.chunk_size = 8

  config.eval.metrics = ("fid_inception", "clip_score")
  config.eval.num_samples = 1000
  config.eval.num_clip_samples = 500
  config.eval.chunk_size = 16

  if kind == "lora":
    lora = config.model.lora
    lora.rank = 8
    lora.alpha = 8.0
    lora.base_dtype = "bfloat16"  # the frozen base in half the memory
    optim.learning_rate = 1e-4
    optim.ema_decay = 0.0  # diffusers' LoRA scripts keep no EMA
    config.sampling.use_ema = False
    training.checkpoint_every = 500
  return config
