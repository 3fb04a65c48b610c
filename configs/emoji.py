"""Text-to-image on emoji: a folder of captioned RGBA icons, 64x64 RGB.

Made for ../shared/assets/emoji_noto (3786 Noto emoji with their Unicode
names as captions: "flag of Japan", "smiling face with halo", "thumbs up
sign: dark skin tone"), and works on any image folder in that layout
(images + metadata.jsonl with file_name and text). Transparent pixels are
composited onto white (data.background); 5% of the images, chosen by a hash
of their file names (data.holdout_fraction), are held out of training for
the validation loss and the autoencoder's reconstruction figures.

The recipe, its measurements and the pixel-space alternative:
docs/emoji_results.md. Three config strings:

  # 1. jaxsd's own autoencoder: 64x64x3 -> 16x16x4 latents
  jaxsd-train-autoencoder --config=configs/emoji.py:autoencoder \
      --workdir=runs/emoji_ae --config.data.path=../shared/assets/emoji_noto
  # 2. latent diffusion on it (the default; model.autoencoder names run 1)
  python -m jaxsd.main --config=configs/emoji.py --workdir=runs/emoji \
      --config.data.path=../shared/assets/emoji_noto
  # or pixel space, no autoencoder: configs/emoji.py:pixel

No flips (flags and text are not mirror-symmetric), no pooled text
embedding (a jaxsd-only path that diffusers' StableDiffusionPipeline cannot
load): a latent run exports with `jaxsd-export`.
"""
from configs import default

KINDS = ("latent", "pixel", "autoencoder")

# Prompts of the periodic grid and of docs/emoji_results.md: each category.
PROMPTS = (
    "flag of Japan", "flag of France", "flag of Sweden", "flag of Brazil",
    "smiling face with sunglasses", "face with tears of joy", "pile of poo",
    "red apple", "banana", "slice of pizza", "dog face", "penguin",
    "frog face", "thumbs up sign", "thumbs up sign: dark skin tone",
    "red heart")


def get_config(kind: str = "latent"):
  if kind not in KINDS:
    raise ValueError(f"configs/emoji.py:{kind}: choose one of "
                     + ", ".join(f"configs/emoji.py:{k}" for k in KINDS)
                     + " (configs/emoji.py alone is latent).")
  config = default.get_config()
  data = config.data
  data.source = "imagefolder"
  data.path = ""  # required: --config.data.path=.../emoji_noto
  data.image_size = 64
  data.num_channels = 3
  data.crop = "center"
  data.random_flip = False
  data.background = "white"
  data.holdout_fraction = 0.05
  data.workers = 1

  # A CLIP text encoder trained from scratch with the UNet: no pretrained
  # text encoder is reachable offline, and the captions are short (at most
  # 21 tokens with the start and end tokens).
  text = config.text
  text.max_length = 24
  text.hidden_size = 256
  text.num_layers = 3
  text.num_heads = 4
  text.intermediate_size = 1024

  # The default autoencoder's losses (L1 + 1e-6 KL, no discriminator),
  # 4 latent channels and measured scaling factor; three levels.
  ae = config.autoencoder
  ae.block_out_channels = (32, 64, 128)  # 64 -> 32 -> 16
  ae.eval_images = 189  # of the 195 held-out images (5% of 3786)

  config.diffusion.schedule = "cosine"
  # v-prediction, as configs/mnist.py: under the cosine schedule the noisiest
  # step has ab = 2.4e-9, where an epsilon model's x0 estimate multiplies
  # its error by 1/sqrt(ab) ~ 2e4 (latents are not clipped), and the first
  # sampler step turns into saturated speckle (docs/emoji_results.md).
  config.diffusion.prediction_type = "v_prediction"
  config.diffusion.cfg_dropout = 0.1

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999

  training = config.training
  training.batch_size = 32
  training.num_steps = 2000  # about an hour on 2 CPU cores (docs)
  training.log_every = 50
  training.eval_every = 500
  training.checkpoint_every = 500

  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 20
  config.sampling.guidance_scale = 4.0
  config.sampling.prompts = PROMPTS
  config.sampling.samples_per_prompt = 1

  ev = config.eval
  ev.metrics = ("val_loss",)
  ev.reference_split = "test"  # the held-out 5%
  ev.val_loss_examples = 128
  ev.num_samples = 500

  if kind == "autoencoder":
    training.batch_size = 16
    training.num_steps = 800
    training.log_every = 25
    training.eval_every = 400
    training.checkpoint_every = 400
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 50
    config.eval.metrics = ()
    return config

  model = config.model
  model.layers_per_block = 1
  model.attention_head_dim = 8
  if kind == "pixel":
    # 64x64x3: levels 64, 32, 16, attention at 16x16 only (longer
    # self-attention is what makes a CPU step slow).
    model.in_channels = model.out_channels = 3
    model.block_out_channels = (32, 64, 128)
    model.down_block_types = ("DownBlock2D", "DownBlock2D",
                              "CrossAttnDownBlock2D")
    model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    return config
  # Latent: 16x16x4, levels 16, 8, 4, attention at all three.
  model.autoencoder = "runs/emoji_ae"
  model.in_channels = model.out_channels = ae.latent_channels
  model.block_out_channels = (64, 128, 256)
  model.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                            "CrossAttnDownBlock2D")
  model.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                          "CrossAttnUpBlock2D")
  return config
