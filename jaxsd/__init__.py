"""jaxsd: text-conditioned diffusion models in JAX/Flax."""
from jaxsd import xla_flags as _xla_flags

_xla_flags.use_fast_cpu_kernels()
