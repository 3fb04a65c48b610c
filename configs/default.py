"""Default configuration: every field jaxsd reads, with documented defaults.

Neutral about the data: an RGB pixel-space model on a folder of captioned
images (data.path is required: `--config.data.path=DIR`), sampling the
data's own captions and judged by metrics that take any images. Experiment
files (`configs/mnist.py`, ...) start from this tree and override fields;
any field can also be overridden on the command line, e.g.
`--config.training.num_steps=100`. Unknown keys are errors.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # --- Data ---------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  # Machine-dependent fields are "" here: jaxsd.environment.resolve fills
  # them from the environment when a run starts, and config.json keeps the
  # resolved values.
  # data.source="mnist": folder with the four original MNIST files; builds
  # the dataset offline ("" = $JAXSD_MNIST_DIR, else download).
  data.mnist_dir = ""
  # Where tfds keeps prepared datasets ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).
  data.tfds_data_dir = ""
  # Captions of labelled data (class subfolders, tfds / HF labels): the
  # fields are {label} (the class index) and {label_name}.
  data.caption_template = "{label_name}"
  data.image_size = 64  # square side in pixels, after the crop and resize
  # Aspect-ratio buckets (jaxsd/data/buckets.py): "off" = every image
  # resized and cropped to image_size x image_size; "auto" = buckets of
  # about image_size**2 pixels, sides multiples of the model's downsampling,
  # aspect ratios up to bucket_max_aspect; or "HxW,HxW,..." (e.g.
  # "48x88,56x72,64x64,72x56,88x48"). Each image trains at the bucket
  # nearest its aspect ratio; each bucket shape compiles its own step.
  data.buckets = "off"
  data.bucket_max_aspect = 2.0  # "auto": long side / short side at most
  data.max_buckets = 32  # more buckets (compiled steps) than this: refused
  data.random_flip = False  # horizontal flips; wrong for text and digits
  data.shuffle = True
  # Where the captioned images come from (jaxsd/data/sources.py): mnist |
  # tfds | imagefolder | webdataset | coco | huggingface.
  data.source = "imagefolder"
  data.name = ""  # tfds name or Hugging Face dataset id
  data.split = "train"
  data.path = ""  # imagefolder / coco image folder / webdataset shards / HF folder
  data.captions_file = ""  # coco: captions_train2017.json
  data.caption_key = ""  # tfds / HF / webdataset json: the caption field
  data.image_key = ""  # HF: the image column ("" = "image")
  data.coco_captions = "random"  # random: one per image per epoch | all
  data.num_channels = 3  # 3: RGB, 1: grayscale
  data.crop = "center"  # center | random
  # Images with transparency (RGBA, grey + alpha, palette or RGB with a
  # transparent colour) are composited onto this colour wherever jaxsd
  # decodes images (training, previews, the latent cache, evaluation's
  # reference and held-out images): a name ("white", "black"), "#rrggbb"
  # or "r,g,b". Their transparent pixels hold arbitrary colour otherwise.
  data.background = "white"
  # imagefolder: this share of the images (a fixed hash of each relative
  # path) is held out of training and is split "test" (validation loss,
  # FID reference, eval prompts); 0 = the folder is one split.
  data.holdout_fraction = 0.0
  data.workers = 0  # decoding worker processes (0: in the training process)
  data.shuffle_buffer = 1000  # streamed sources: examples shuffled together
  data.cycle_length = 4  # streamed sources: shards read at once, interleaved
  # Undecodable images are skipped (data/skipped); past this share of the
  # images read, the run stops naming them.
  data.max_skipped_fraction = 0.01
  # Latent runs: a latent cache (jaxsd-cache) of this data, read
  # for training instead of encoding the images every step. "" = encode on
  # the fly.
  data.latent_cache = ""

  # --- Text encoder (transformers FlaxCLIPTextModel) ----------------------
  config.text = text = ml_collections.ConfigDict()
  # Hub id or local folder ("" = $JAXSD_CLIP_TOKENIZER, else
  # openai/clip-vit-large-patch14).
  text.tokenizer = ""
  text.max_length = 77  # tokens per caption (padded / truncated)
  # A CLIP text encoder: a hub id or folder of a FlaxCLIPTextModel, or a
  # folder (text_encoder/ or a pipeline's) of PyTorch weights; "" = fresh.
  text.pretrained = ""
  text.trainable = True
  # Architecture of a freshly initialised encoder (ignored when pretrained).
  text.hidden_size = 512
  text.num_layers = 4
  text.num_heads = 8
  text.intermediate_size = 2048

  # --- UNet ---------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.implementation = "jaxsd"  # "jaxsd" (models/unet.py) | "diffusers"
  # A diffusers UNet: a local unet/ folder or a pipeline folder holding one
  # (PyTorch weights, jaxsd/models/unet_convert.py); "" = fresh weights.
  model.pretrained = ""
  # A diffusers Stable Diffusion pipeline folder (model_index.json, unet/,
  # vae/, text_encoder/, tokenizer/, scheduler/; PyTorch weights) to start
  # from: it sets model.pretrained, model.autoencoder, the architecture,
  # text.*, diffusion.* and the DDIM sampling settings
  # (jaxsd/interop/sd_pipeline.py).
  model.pretrained_pipeline = ""
  # Gradient checkpointing (jaxsd/models/remat.py): "blocks" keeps only
  # each down/mid/up block's inputs for the backward pass and recomputes
  # the rest, "transformers" each spatial transformer, "attention" each
  # attention layer; "blocks_saving_dots" / "blocks_saving_names" recompute
  # blocks but keep their matmul outputs / their resnets' and transformers'
  # outputs; "none" keeps all. Takes effect on XLA:CPU too.
  model.remat = "none"
  model.in_channels = 3  # data.num_channels in pixel space
  model.out_channels = 3
  model.block_out_channels = (64, 128, 128)
  # Attention at the full-size level costs (H*W tokens)^2 per head; the
  # default keeps it to the two halved levels.
  model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D",
                            "CrossAttnDownBlock2D")
  model.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                          "UpBlock2D")
  model.layers_per_block = 1
  model.attention_head_dim = 8  # heads per block (diffusers' naming)
  # Transformer blocks attend to the text twice instead of self-attending
  # (diffusers' only_cross_attention): no (H*W)^2 scores.
  model.only_cross_attention = False
  # Adds a projection of the pooled text encoding to the timestep embedding
  # (as SDXL adds its pooled text embedding), so every resnet sees the prompt:
  # a global conditioning path next to cross-attention. "" = off; "mean" =
  # token mean; "flatten" = all max_length token vectors side by side (each
  # token keeps its own weights: learns short fixed-length prompts fastest).
  model.pooled_text_embedding = ""
  model.norm_num_groups = 32
  model.use_linear_projection = False
  model.dtype = "float32"  # compute dtype; "bfloat16" keeps f32 master weights
  # Latent diffusion: the frozen autoencoder whose latents the UNet denoises
  # (model.in_channels / out_channels = its latent_channels). A diffusers
  # `vae/` folder, a Stable Diffusion pipeline folder (its `vae/`), or a
  # jaxsd autoencoder workdir (jaxsd-train-autoencoder). "" = pixel
  # space.
  model.autoencoder = ""
  # LoRA (jaxsd/models/lora.py): rank > 0 trains low-rank adapters on the target
  # projections only; the base weights stay frozen (base_dtype) and out of
  # the checkpoints, which hold the adapters and a fingerprint of the base.
  model.lora = lora = ml_collections.ConfigDict()
  lora.rank = 0  # 0 = off (full training)
  lora.alpha = 0.0  # scale alpha / rank; 0 = rank (scale 1)
  lora.dropout = 0.0  # on the adapters' input
  lora.unet_targets = ("to_q", "to_k", "to_v", "to_out_0")
  lora.text_targets = ()  # e.g. ("q_proj", "k_proj", "v_proj", "out_proj")
  lora.base_dtype = "float32"  # "bfloat16" halves the frozen base's memory

  # --- Autoencoder (jaxsd-train-autoencoder) ----------------------
  # A KL autoencoder with diffusers' AutoencoderKL architecture
  # (jaxsd/models/autoencoder.py); it trains on `data` with `training`,
  # `optim` and `logging` as the diffusion trainer does. Its in/out channels
  # are data.num_channels.
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.block_out_channels = (64, 128)  # downsampling 2^(len - 1)
  ae.layers_per_block = 1
  ae.latent_channels = 4
  ae.norm_num_groups = 32
  ae.mid_block_add_attention = True
  ae.use_quant_conv = True
  ae.use_post_quant_conv = True
  # Diffusion runs on (z - shift_factor) * scaling_factor. 0 = measured when
  # checkpointing: 1 / std of the posterior means of training images (as
  # Stable Diffusion's 0.18215 was).
  ae.scaling_factor = 0.0
  ae.shift_factor = 0.0
  ae.reconstruction_loss = "l1"  # l1 | mse (per pixel, mean)
  ae.kl_weight = 1e-6  # times the KL summed over latent elements, batch mean
  # Patch discriminator (hinge GAN loss, as SD's autoencoders) from this
  # step on; < 0 = never.
  ae.disc_start = -1
  ae.disc_weight = 0.5
  ae.disc_channels = 64
  ae.disc_layers = 3
  ae.eval_images = 256  # held-out images for eval/psnr and eval/rfid

  # --- Diffusion ----------------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "cosine"  # linear | scaled_linear | cosine
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 0.0  # linear / scaled_linear betas; 0 = default
  diffusion.beta_end = 0.0
  # Zero terminal SNR (Lin et al. 2024; diffusers' rescale_betas_zero_snr):
  # the last timestep is pure noise. Needs v_prediction.
  diffusion.rescale_zero_snr = False
  diffusion.prediction_type = "epsilon"  # epsilon | v_prediction
  diffusion.min_snr_gamma = 0.0  # > 0 enables min-SNR-gamma loss weighting
  diffusion.cfg_dropout = 0.1  # probability of training on the empty prompt
  # Training timesteps: "uniform", or "logit_normal" (t/T = sigmoid(N(m, s)),
  # fewer examples at the nearly clean and nearly pure-noise ends).
  diffusion.timestep_sampling = "uniform"
  diffusion.logit_mean = 0.0
  diffusion.logit_std = 1.0
  # Noise options (jaxsd/diffusion/noise.py), each 0 = off. Offset noise
  # (diffusers' --noise_offset): noise += offset * N(0, 1) per sample and
  # channel, so the model can shift an image's overall brightness; 0.1 is
  # usual. Pyramid noise (kohya's --multires_noise_iterations/_discount):
  # noise at coarser random resolutions added, level i weighted
  # discount**i, rescaled to unit std; 6 to 10 iterations are usual.
  # Input perturbation (diffusers' --input_perturbation): x_t is built from
  # noise + gamma * N(0, 1), the target stays the noise; 0.1 is usual.
  diffusion.noise_offset = 0.0
  diffusion.multires_noise_iterations = 0
  diffusion.multires_noise_discount = 0.3
  diffusion.input_perturbation = 0.0
  # The loss per element (kohya's --loss_type): "l2" (MSE), "l1", or
  # "huber": 2c (sqrt(err^2 + c^2) - c), l2-like within c of the target and
  # l1-like beyond; c = huber_c ("constant"), or kohya's default "snr"
  # schedule, from 1 at clean timesteps to huber_c at noisy ones.
  diffusion.loss_type = "l2"
  diffusion.huber_c = 0.1
  diffusion.huber_schedule = "snr"

  # --- Optimisation -------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  # "adamw" or "adafactor" (factored second moment, no first: about no
  # state for kernels); AdamW's moments in "float32" (8 bytes a param) or
  # "bfloat16" (4; the second moment rounded stochastically). The state's
  # bytes per parameter are logged at start (jaxsd/training/state.py).
  optim.optimizer = "adamw"
  optim.moment_dtype = "float32"
  optim.learning_rate = 1e-3
  optim.warmup_steps = 100
  optim.end_learning_rate_factor = 0.0  # cosine decays to lr * this
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 1e-2  # not applied to biases, norm scales, embeddings
  optim.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  optim.ema_decay = 0.999
  optim.grad_accum_steps = 1  # micro-batches per step (same global batch)

  # --- Training loop --------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.num_steps = 10_000
  training.batch_size = 128  # global, over all processes and devices
  training.seed = 0
  training.log_every = 50
  training.eval_every = 2000
  training.checkpoint_every = 2000
  training.keep_checkpoints = 3
  training.steps_per_call = 1  # train steps fused into one jitted call
  # A new run (an empty --workdir) from another run's weights: its workdir.
  # Params and EMA params are loaded; the optimiser and step start fresh, so
  # optimiser or schedule settings may differ, parameter shapes may not. A
  # workdir that already holds checkpoints resumes and ignores it.
  training.init_from = ""
  training.init_from_step = -1  # that run's checkpoint step; -1 = latest

  # --- Sampling (periodic grids and jaxsd-sample) ----------------------------
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ddim"
  sampling.num_steps = 50
  sampling.guidance_scale = 3.0
  sampling.eta = 0.0
  # Clip the x0 estimate at every step: True = to [-1, 1] in pixel runs
  # (latent runs: off); a number c = to [-c, c] in either.
  sampling.clip_x0 = True
  # Timesteps: "trailing" (starts at T - 1, ends at the data), or diffusers'
  # "leading" (+ steps_offset) / "linspace" as SD's DDIMScheduler; the last
  # step goes to alpha_cumprod 1 ("one") or alphas_cumprod[0] ("first", SD's
  # set_alpha_to_one=False).
  sampling.timestep_spacing = "trailing"
  sampling.steps_offset = 0
  sampling.final_alpha = "one"
  # Guidance only where lo <= t/T <= hi (1 = pure noise); the conditional
  # output alone elsewhere. (0, 1) = every step.
  sampling.guidance_interval = (0.0, 1.0)
  sampling.use_ema = True
  sampling.samples_per_prompt = 2  # per prompt in the periodic grid
  sampling.chunk_size = 64  # images per jitted sampling call (bounds memory)
  # Sides in pixels of the sampled images (the periodic grid, evaluation):
  # multiples of the UNet's 2**(levels - 1), times the autoencoder's
  # downsampling in latent runs; 0 = data.image_size.
  sampling.height = 0
  sampling.width = 0
  # () = the first distinct captions of the training data.
  sampling.prompts = ()

  # --- Evaluation (every training.eval_every steps and jaxsd-evaluate) --------
  config.eval = ev = ml_collections.ConfigDict()
  # Metrics that judge any images, and val_loss (needs no network); MNIST's
  # own (prompt_accuracy, fid_mnist, diversity): configs/mnist.py.
  ev.metrics = ("fid_inception", "clip_score", "val_loss")
  ev.num_samples = 1000  # generated images (prompts cycle over eval prompts)
  # Evaluation prompts: this file's lines; else (data.source="mnist") the
  # ten digit captions; else the captions of eval.reference_split, in order.
  ev.prompts_file = ""
  # The held-out split whose real images are the FID reference.
  ev.reference_split = "test"
  ev.num_clip_samples = 500  # of those, scored by CLIP
  ev.chunk_size = 250  # images per jitted sampling call during evaluation
  ev.cache_dir = ""  # classifier, reference statistics ("" = $JAXSD_CACHE or ~/.cache/jaxsd)
  ev.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth ("" = cache/download)
  ev.inception_reference_samples = 10000  # real images for Inception stats
  ev.clip_model = "openai/clip-vit-base-patch32"  # hub id or local folder
  # val_loss: the training loss on the first val_loss_examples examples of
  # eval.reference_split, at val_loss_timesteps fixed timesteps (centres of
  # equal bins of the schedule, each logged as eval/val_loss/t_<t>) with
  # noise from a fixed seed: the same numbers for the same weights in any
  # run on the same data.
  ev.val_loss_examples = 64
  ev.val_loss_timesteps = 5

  # --- Logging ------------------------------------------------------------
  config.logging = logging = ml_collections.ConfigDict()
  logging.mlflow = True
  logging.experiment_name = "jaxsd"
  logging.run_name = ""  # "" = the workdir's name

  # --- Parallelism ----------------------------------------------------------
  config.parallel = parallel = ml_collections.ConfigDict()
  # "auto": jax.distributed.initialize() under SLURM / when a coordinator is set.
  parallel.distributed = "auto"  # auto | on | off
  # > 0: present the CPU as this many devices (data parallel over them; no
  # faster than one device on 2 cores now that convolutions use both cores,
  # benchmarks/README.md). 0 = one CPU device.
  # No effect on GPU/TPU runs or when XLA_FLAGS already sets a count.
  parallel.cpu_devices = 0
  # Fully-sharded state (FSDP) for models too big to replicate: parameters,
  # EMA and optimiser state split over a `model` mesh axis of this many
  # devices (0 = all); the batch is still split over every device.
  parallel.fsdp = False
  parallel.model_axis_size = 0
  parallel.fsdp_min_size = 2**16  # arrays with fewer elements stay replicated

  return config
