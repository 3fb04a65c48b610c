"""Peak memory of one Stable Diffusion 1.5-sized UNet train step.

  python benchmarks/bench_memory.py [--size=sd|small] [--mode=full,lora]
      [--remat=none,blocks] [--compute_dtype=float32,bfloat16]
      [--base_dtype=float32] [--framework=jaxsd,pytorch] [--batch=1]
      [--steps=2]

One train step is forward + backward + an AdamW update of jaxsd's `UNet`
with random weights on random inputs: 64x64x4 latents (`--resolution`),
`--batch` 1, a [B, 77, 768] text context, epsilon-prediction MSE.

- `--size=sd`: SD 1.5's UNet (block_out_channels (320, 640, 1280, 1280),
  2 layers per block, 8 heads, cross_attention_dim 768; 859.5M params);
  `--size=small`: the same layout at (64, 128, 256, 256) channels (35.0M), a
  quick smoke run.
- `--mode=full`: every UNet param trained; float32 master weights and
  AdamW state; `--compute_dtype` is the UNet's `dtype` field.
- `--mode=lora`: the base weights frozen (stored as `--base_dtype`) and only
  LoRA adapters (`--lora_rank`) on the attention projections to_q, to_k,
  to_v and to_out_0 trained with AdamW, through `jaxsd.models.lora`
  (`init_adapters`, `apply_with_adapters`).
- `--remat`: `UNet.remat` policies (jaxsd/models/remat.py).
- `--framework=pytorch`: the same step in PyTorch (diffusers'
  `UNet2DConditionModel` with the same config, peft LoRA on to_q, to_k, to_v,
  to_out.0, torch.optim.AdamW; remat = diffusers' gradient checkpointing,
  bf16 compute = `torch.autocast`), each configuration in a fresh process
  after jaxsd's, so the two are measured one after the other in one run;
  the summary gives jaxsd / PyTorch ratios of peak RSS and step time.

Every combination of the list flags (`--base_dtype` for lora only) runs in a
fresh subprocess, one at a time, so its peak RSS is its own. A child
compiles the step ahead of time from shapes (`jit(...).lower(...).compile()`,
its `memory_analysis()`: argument, output, alias and temp bytes), then
checks that /proc/meminfo's MemAvailable covers what XLA planned
(arguments + temp + non-aliased outputs, plus 10%) and skips with the
figures if not; only then does it initialise the params (drawn on the
host leaf by leaf by `host_params`, as a checkpoint import fills them,
without the UNet's initialisers; the adapters and optimiser state jitted;
`--compile_only` stops before this)
and run 1 warm-up and
`--steps` timed steps (median reported), the params and optimiser state
donated. Before a child starts the parent
checks that MemAvailable covers the state alone (full: params, two AdamW
moments and the gradients, 16 bytes a param; lora: the base params), and
skips it if not.

Prints one JSON object per configuration (peak RSS from the child's
ru_maxrss and VmHWM, RSS after compiling and after setting up the state,
the peak up to then,
XLA's figures, compile and step seconds) and a summary table, then the
machine (CPU model name, AVX-512F, cores, MemAvailable at the start).

Remat takes effect on XLA:CPU through jaxsd/models/remat.py (plain
`jax.checkpoint` does not there: the CPU compiler drops its optimisation
barriers and CSE folds the recomputation back into the forward pass).
"""
import ctypes
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    "sd": dict(block_out_channels=(320, 640, 1280, 1280)),
    "small": dict(block_out_channels=(64, 128, 256, 256)),
}
# SD 1.5's unet/config.json, less the channels.
SD_LAYOUT = dict(
    in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"))
MODES = ("full", "lora")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "blocks", "transformers", "attention",
          "blocks_saving_dots", "blocks_saving_names")
FRAMEWORKS = ("jaxsd", "pytorch")
GB = 1e9


def define_flags():
  """This script's flags (not defined on import: gpu_check.py imports the
  model and step builders below and has flags of its own)."""
  flags.DEFINE_enum("size", "sd", list(SIZES), "UNet size.")
  flags.DEFINE_list("mode", list(MODES), "full and/or lora.")
  flags.DEFINE_list("remat", ["none", "blocks"],
                    f"UNet.remat policies {REMATS}.")
  flags.DEFINE_list("compute_dtype", ["float32"], f"UNet dtype {DTYPES}.")
  flags.DEFINE_list("framework", list(FRAMEWORKS),
                    f"{FRAMEWORKS}: each configuration in each.")
  flags.DEFINE_list("base_dtype", ["float32"],
                    f"Frozen base param storage in lora mode {DTYPES}.")
  flags.DEFINE_integer("batch", 1, "Batch size.")
  flags.DEFINE_integer("resolution", 64, "Latent height and width.")
  flags.DEFINE_integer("tokens", 77, "Text context length.")
  flags.DEFINE_integer("lora_rank", 4, "LoRA rank (alpha = rank).")
  flags.DEFINE_integer("steps", 2, "Timed steps after one warm-up (median).")
  flags.DEFINE_float("margin", 0.1, "Headroom asked of MemAvailable over the "
                     "estimated need (a fraction of it).")
  flags.DEFINE_bool("compile_only", False, "Compile and report XLA's plan; "
                    "allocate and run nothing (no memory check needed).")
  flags.DEFINE_string("child", "", "Internal: one configuration as JSON.")


FLAGS = flags.FLAGS


# ------------------------------------------------------------------------
# The model and train steps (shared with gpu_check.py)
# ------------------------------------------------------------------------


def make_unet(size: str, compute_dtype: str = "float32", remat="none"):
  """jaxsd's UNet in SD 1.5's layout at `size` (SIZES)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxsd.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  return unet_lib.UNet(**SD_LAYOUT, **SIZES[size],
                       dtype=getattr(jnp, compute_dtype), remat=remat)


def input_shapes(model, batch: int, resolution: int, tokens: int):
  """ShapeDtypeStructs of (noisy latents, timesteps, context, noise)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  latents = jax.ShapeDtypeStruct(
      (batch, resolution, resolution, model.in_channels), jnp.float32)
  return {"x_t": latents,
          "t": jax.ShapeDtypeStruct((batch,), jnp.int32),
          "context": jax.ShapeDtypeStruct(
              (batch, tokens, model.cross_attention_dim), jnp.float32),
          "noise": latents}


def random_batch(shapes, seed: int = 0):
  """Random arrays of `input_shapes` (timesteps in [0, 1000))."""
  import jax  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  out = {}
  for key, (name, s) in zip(keys, sorted(shapes.items())):
    out[name] = (jax.random.randint(key, s.shape, 0, 1000) if name == "t"
                 else jax.random.normal(key, s.shape, s.dtype))
  return out


def init_inputs(model, shapes):
  """Zero (latents, timesteps, context) for `model.init` (traced for the
  params' shapes by `param_shapes`): the latents at the smallest size the
  blocks take (the params do not depend on it), the context as given."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  side = 2 ** (len(model.block_out_channels) - 1)
  return (jnp.zeros((1, side, side, model.in_channels), jnp.float32),
          jnp.zeros((1,), jnp.int32),
          jnp.zeros((1,) + shapes["context"].shape[1:], jnp.float32))


def param_shapes(model, shapes):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), *init_inputs(model, shapes)))[
          "params"]


def host_params(shapes, seed: int = 0):
  """Params of `shapes` at an initialiser's scale (kernels N(0, 1/fan_in),
  norm scales 1, biases 0), drawn with numpy and placed on the device one
  leaf at a time: no compile, and no more memory than the params."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      value = np.ones(s.shape, np.float32)
    elif name == "bias":
      value = np.zeros(s.shape, np.float32)
    else:  # kernel [..., in, out]
      fan_in = int(np.prod(s.shape[:-1])) or 1
      value = rng.standard_normal(s.shape, dtype=np.float32)
      value *= np.float32(1.0 / np.sqrt(fan_in))
    return jax.device_put(value.astype(s.dtype))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def nbytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def optimizer():
  import optax  # pylint: disable=g-import-not-at-top
  return optax.adamw(1e-5, weight_decay=1e-2)


class TrainStep:
  """One configuration's step and state, built from shapes.

  `state_shapes` / `init_state(rng)`: (trained, frozen, optimiser state);
  `step(state, batch) -> (state, loss)` (state donated). full: trained =
  the UNet params (float32), frozen = (); lora: trained = the adapters,
  frozen = the base params in `base_dtype`.
  """

  def __init__(self, model, shapes, mode: str, base_dtype: str = "float32",
               lora_rank: int = 4):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jaxsd.models import lora  # pylint: disable=g-import-not-at-top
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; choose one of {MODES}.")
    self.model, self.mode, self.tx = model, mode, optimizer()
    self.base_dtype = getattr(jnp, base_dtype)
    self.lora_rank = lora_rank
    params = param_shapes(model, shapes)
    self.num_params = count(params)

    def init_rest(rng, params):
      if mode == "full":
        return params, (), self.tx.init(params)
      adapters = lora.init_adapters(jax.random.fold_in(rng, 1), params,
                                    lora.UNET_TARGETS, lora_rank)
      base = jax.tree_util.tree_map(lambda p: p.astype(self.base_dtype),
                                    params)
      return adapters, base, self.tx.init(adapters)

    # The UNet's params drawn on the host leaf by leaf (host_params), not
    # by its init: in one jitted program every initialiser compiles
    # separately and the program holds temporaries beyond the params (SD
    # LoRA: 9.15 GB of RSS after the jitted init, 67-78 s), and op by op
    # each initialiser still compiles once per shape (SD 46-64 s, small
    # 26-35 s; 2026-12-06, AMD EPYC, 2 cores). A real fine-tune imports
    # its base leaf by leaf, as this does; the step does not depend on the
    # values, only on their scale.
    self._param_shapes = params
    self._init_rest = jax.jit(init_rest, donate_argnums=1)
    self.state_shapes = jax.eval_shape(init_rest, jax.random.key(0), params)
    self.num_trained = count(self.state_shapes[0])

    def loss_fn(trained, frozen, batch):
      args = (batch["x_t"], batch["t"], batch["context"])
      apply = lambda p, *a: model.apply({"params": p}, *a, True)
      if mode == "full":
        out = apply(trained, *args)
      else:
        out = lora.apply_with_adapters(apply, frozen, trained, *args,
                                       alpha=float(lora_rank))
      return jnp.mean(jnp.square(out - batch["noise"]))

    def step(state, batch):
      trained, frozen, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, batch)
      updates, opt_state = self.tx.update(grads, opt_state, trained)
      import optax  # pylint: disable=g-import-not-at-top
      trained = optax.apply_updates(trained, updates)
      return (trained, frozen, opt_state), loss

    self.step = jax.jit(step, donate_argnums=0)

  def init_state(self, rng):
    import jax  # pylint: disable=g-import-not-at-top
    seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
    return self._init_rest(rng, host_params(self._param_shapes, seed))

  def compile(self, shapes):
    return self.step.lower(self.state_shapes, shapes).compile()


def memory_analysis(compiled):
  """XLA's buffer sizes in bytes ({} where the backend gives none): the
  figures a training run logs at start (jaxsd.tracking.memory)."""
  from jaxsd.tracking import memory  # pylint: disable=g-import-not-at-top
  plan = memory.compiled_plan(compiled)
  plan.pop("peak_bytes", None)
  return plan


# ------------------------------------------------------------------------
# Host memory
# ------------------------------------------------------------------------


def meminfo_bytes(key: str = "MemAvailable") -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(key)


def proc_status_bytes(key: str) -> int:
  """VmRSS / VmHWM of this process, bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(key)


def median_ms(fn, repeats: int, sync=lambda r: r) -> float:
  """Median ms of `repeats` calls of fn (after one untimed call), each
  waited for by `sync` (jax.block_until_ready for JAX's arrays)."""
  sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def torch_child_output(script: str, *args: str):
  """The JSON last line of `script --torch_child *args`, run in a fresh
  process (PyTorch's side of a benchmark, after JAX's)."""
  child = subprocess.run([sys.executable, script, "--torch_child", *args],
                         check=True, capture_output=True, text=True)
  return json.loads(child.stdout.splitlines()[-1])


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux KiB


def cpu_info():
  """Model name, AVX-512F and cores of the first CPU in /proc/cpuinfo."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if "model name" in fields and "flags" in fields:
          break
  except OSError:
    pass
  return {"model_name": fields.get("model name", platform.processor()),
          "avx512f": ("avx512f" in fields["flags"].split()
                      if "flags" in fields else None),
          "cores": os.cpu_count()}


# ------------------------------------------------------------------------
# One configuration (child process)
# ------------------------------------------------------------------------


def run_config(spec):
  """Figures of one configuration, measured in this (fresh) process."""
  import jax  # pylint: disable=g-import-not-at-top
  result = dict(spec)
  model = make_unet(spec["size"], spec["compute_dtype"], spec["remat"])
  shapes = input_shapes(model, spec["batch"], spec["resolution"],
                        spec["tokens"])
  train = TrainStep(model, shapes, spec["mode"], spec["base_dtype"],
                    spec["lora_rank"])
  result.update(params=train.num_params, trained_params=train.num_trained,
                state_bytes=nbytes(train.state_shapes),
                backend=jax.default_backend(),
                device=jax.devices()[0].device_kind)
  start = time.perf_counter()
  compiled = train.compile(shapes)
  result["compile_s"] = time.perf_counter() - start
  result["xla"] = xla = memory_analysis(compiled)
  # As jaxsd's trainer does after compiling its step (tracking.memory).
  from jaxsd.tracking import memory  # pylint: disable=g-import-not-at-top
  memory.release_freed_host_memory()
  result["rss_after_compile_bytes"] = proc_status_bytes("VmRSS")
  result["peak_rss_compile_bytes"] = peak_rss_bytes()
  if spec.get("compile_only"):
    return result
  if xla:
    need = (xla["argument_bytes"] + xla["temp_bytes"] + xla["output_bytes"]
            - xla["alias_bytes"])
    result["xla_need_bytes"] = need
    available = meminfo_bytes()
    result["mem_available_bytes"] = available
    if available < need * (1 + spec["margin"]):
      result["skipped"] = (
          f"XLA plans {need / GB:.2f} GB (arguments + temp + outputs not "
          f"aliased); MemAvailable is {available / GB:.2f} GB, under that "
          f"plus {spec['margin']:.0%}")
      return result
  start = time.perf_counter()
  state = train.init_state(jax.random.key(0))
  batch = random_batch(shapes)
  jax.block_until_ready((state, batch))
  result["init_s"] = time.perf_counter() - start
  # As the trainer, which compiles its step (and trims) once the state
  # exists: the set-up's freed heap does not stay in RSS under the step.
  result["rss_before_trim_bytes"] = proc_status_bytes("VmRSS")
  memory.release_freed_host_memory()
  result["rss_after_init_bytes"] = proc_status_bytes("VmRSS")
  result["peak_rss_init_bytes"] = proc_status_bytes("VmHWM")
  times, losses = [], []
  for _ in range(1 + spec["steps"]):
    start = time.perf_counter()
    # Through jit's dispatch, not `compiled` itself: on CPU the remat
    # policies (models/remat.py) close over constants that jit passes and
    # an ahead-of-time executable called directly does not ("compiled for
    # N inputs but called with M"). The warm-up step absorbs any compile.
    state, loss = train.step(state, batch)
    losses.append(float(loss))  # waits for the step
    times.append(time.perf_counter() - start)
  result.update(warmup_step_s=times[0], step_s=statistics.median(times[1:]),
                step_times_s=times[1:], losses=losses,
                peak_rss_bytes=peak_rss_bytes(),
                vm_hwm_bytes=proc_status_bytes("VmHWM"))
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return result


# ------------------------------------------------------------------------
# The same step in PyTorch (child process)
# ------------------------------------------------------------------------


def torch_unet(size: str):
  """diffusers' UNet2DConditionModel with make_unet's architecture (its
  attention_head_dim is also the number of heads: diffusers issue #2011)."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  layout = dict(SD_LAYOUT, **SIZES[size])
  return UNet2DConditionModel(
      sample_size=64, norm_num_groups=32,
      **{k: (list(v) if isinstance(v, tuple) else v)
         for k, v in layout.items()})


def run_torch_config(spec):
  """Figures of one configuration in PyTorch, in this (fresh) process."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  result = dict(spec, backend="pytorch " + torch.__version__, device="cpu")
  start = time.perf_counter()
  unet = torch_unet(spec["size"])
  result["params"] = sum(p.numel() for p in unet.parameters())
  if spec["remat"] != "none":
    unet.enable_gradient_checkpointing()
  if spec["mode"] == "lora":
    from peft import LoraConfig  # pylint: disable=g-import-not-at-top
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(
        r=spec["lora_rank"], lora_alpha=spec["lora_rank"],
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
  unet.train()
  trained = [p for p in unet.parameters() if p.requires_grad]
  result["trained_params"] = sum(p.numel() for p in trained)
  opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=1e-2)
  b, r = spec["batch"], spec["resolution"]
  x_t = torch.randn(b, 4, r, r)
  noise = torch.randn(b, 4, r, r)
  t = torch.randint(0, 1000, (b,))
  context = torch.randn(b, spec["tokens"], SD_LAYOUT["cross_attention_dim"])
  result["init_s"] = time.perf_counter() - start
  # The same trim as jaxsd's side (tracking.memory, not imported: jax
  # would count in this process's RSS).
  result["rss_before_trim_bytes"] = proc_status_bytes("VmRSS")
  ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
  result["rss_after_init_bytes"] = proc_status_bytes("VmRSS")
  autocast = (torch.autocast("cpu", dtype=torch.bfloat16)
              if spec["compute_dtype"] == "bfloat16" else
              torch.autocast("cpu", enabled=False))
  times, losses = [], []
  for _ in range(1 + spec["steps"]):
    start = time.perf_counter()
    with autocast:
      out = unet(x_t, t, context).sample
    loss = torch.mean((out.float() - noise) ** 2)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    times.append(time.perf_counter() - start)
  result.update(warmup_step_s=times[0], step_s=statistics.median(times[1:]),
                step_times_s=times[1:], losses=losses,
                peak_rss_bytes=peak_rss_bytes(),
                vm_hwm_bytes=proc_status_bytes("VmHWM"))
  return result


# ------------------------------------------------------------------------
# The grid (parent process)
# ------------------------------------------------------------------------


def _check_choice(values, allowed, flag):
  for v in values:
    if v not in allowed:
      raise app.UsageError(f"--{flag}={v!r}; choose from {list(allowed)}.")


def configurations():
  for flag, allowed in (("mode", MODES), ("remat", REMATS),
                        ("compute_dtype", DTYPES), ("base_dtype", DTYPES)):
    _check_choice(getattr(FLAGS, flag), allowed, flag)
  common = dict(size=FLAGS.size, batch=FLAGS.batch,
                resolution=FLAGS.resolution, tokens=FLAGS.tokens,
                lora_rank=FLAGS.lora_rank, steps=FLAGS.steps,
                margin=FLAGS.margin, compile_only=FLAGS.compile_only)
  _check_choice(FLAGS.framework, FRAMEWORKS, "framework")
  for mode in FLAGS.mode:
    bases = FLAGS.base_dtype if mode == "lora" else ["float32"]
    for compute, base, remat in itertools.product(FLAGS.compute_dtype, bases,
                                                  FLAGS.remat):
      for framework in FLAGS.framework:
        if framework == "pytorch" and (
            FLAGS.compile_only or base != "float32" or
            remat not in ("none", "blocks")):
          continue  # no plan to print; diffusers has one remat, f32 bases
        yield dict(common, mode=mode, compute_dtype=compute, base_dtype=base,
                   remat=remat, framework=framework)


def state_estimate_bytes(spec, num_params: int) -> int:
  """The state's bytes known before compiling: full: float32 params, two
  AdamW moments and the gradients; lora: the base params."""
  if spec["mode"] == "full":
    return 16 * num_params
  return num_params * (2 if spec["base_dtype"] == "bfloat16" else 4)


def run_child(spec):
  cmd = [sys.executable, os.path.abspath(__file__),
         f"--child={json.dumps(spec)}"]
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       check=False)
  wall = time.perf_counter() - start
  lines = [l for l in out.stdout.strip().splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    why = ("killed by signal %d (the kernel's OOM killer sends 9)"
           % -out.returncode if out.returncode < 0 else
           f"exit status {out.returncode}")
    return dict(spec, failed=f"{why}: {out.stderr[-2000:]}", wall_s=wall)
  result = json.loads(lines[-1])
  result["wall_s"] = wall
  return result


def _gb(value):
  return "" if value is None else f"{value / GB:.2f}"


def summary_table(results):
  head = ("| framework | mode | compute | base | remat | trained params | "
          "peak RSS GB | XLA arg / temp / out GB | compile s | step s | "
          "status |")
  rows = [head, "|" + " --- |" * 11]
  for r in results:
    xla = r.get("xla") or {}
    status = ("compiled only" if r.get("compile_only") and "failed" not in r
              else "skipped: " + r["skipped"] if "skipped" in r else
              "failed: " + r["failed"].splitlines()[0] if "failed" in r
              else "ok")
    xla_cell = (" / ".join(_gb(xla.get(f"{k}_bytes"))
                           for k in ("argument", "temp", "output"))
                if xla else "")
    step = r.get("step_s")
    compile_s = r.get("compile_s")
    rows.append(
        f"| {r.get('framework', 'jaxsd')} | {r['mode']} | "
        f"{r['compute_dtype']} | "
        f"{r['base_dtype'] if r['mode'] == 'lora' else '-'} | {r['remat']} | "
        f"{r.get('trained_params', '')} | {_gb(r.get('peak_rss_bytes'))} | "
        f"{xla_cell} | {'' if compile_s is None else f'{compile_s:.0f}'} | "
        f"{'' if step is None else f'{step:.2f}'} | {status} |")
  return "\n".join(rows)


def ratio_table(results):
  """jaxsd / PyTorch peak RSS and step time, per configuration run in both."""
  key = lambda r: (r["mode"], r["compute_dtype"], r["base_dtype"], r["remat"])
  ok = lambda r: "step_s" in r
  torch_runs = {key(r): r for r in results
                if r.get("framework") == "pytorch" and ok(r)}
  rows = ["| mode | compute | base | remat | jaxsd / PyTorch peak RSS | "
          "jaxsd / PyTorch step time |", "|" + " --- |" * 6]
  for r in results:
    other = torch_runs.get(key(r))
    if r.get("framework", "jaxsd") != "jaxsd" or not ok(r) or other is None:
      continue
    rows.append(
        f"| {r['mode']} | {r['compute_dtype']} | {r['base_dtype']} | "
        f"{r['remat']} | {r['peak_rss_bytes'] / other['peak_rss_bytes']:.2f} "
        f"| {r['step_s'] / other['step_s']:.2f} |")
  return "\n".join(rows) if len(rows) > 2 else ""


def main(argv):
  del argv
  if FLAGS.child:
    import jaxsd  # pylint: disable=g-import-not-at-top,unused-import  # XLA flags first
    spec = json.loads(FLAGS.child)
    run = (run_torch_config if spec.get("framework") == "pytorch"
           else run_config)
    print(json.dumps(run(spec)), flush=True)
    return
  model = make_unet(FLAGS.size)
  num_params = count(param_shapes(model, input_shapes(
      model, FLAGS.batch, FLAGS.resolution, FLAGS.tokens)))
  machine = dict(cpu=cpu_info(), platform=platform.platform(),
                 mem_total_bytes=meminfo_bytes("MemTotal"),
                 mem_available_bytes=meminfo_bytes(),
                 load_average=os.getloadavg())
  print(f"UNet size={FLAGS.size}: {num_params:,} params "
        f"({num_params * 4 / GB:.2f} GB in float32)", flush=True)
  results = []
  for spec in configurations():
    need = state_estimate_bytes(spec, num_params)
    available = meminfo_bytes()
    if not FLAGS.compile_only and available < need * (1 + FLAGS.margin):
      result = dict(spec, params=num_params, mem_available_bytes=available,
                    state_estimate_bytes=need,
                    skipped=(f"the state alone needs {need / GB:.2f} GB; "
                             f"MemAvailable is {available / GB:.2f} GB"))
    else:
      result = run_child(spec)
    results.append(result)
    print(json.dumps(result), flush=True)
  print(summary_table(results))
  ratios = ratio_table(results)
  if ratios:
    print(ratios)
  machine["load_average_end"] = os.getloadavg()
  print(json.dumps({"machine": machine}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
