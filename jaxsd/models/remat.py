"""Gradient checkpointing (`UNet.remat`) that takes effect on XLA:CPU too.

A policy names what is recomputed in the backward pass and what is kept:

| policy | recomputed from its inputs | kept inside it |
| --- | --- | --- |
| "none" | nothing | every activation |
| "blocks" | each down, mid and up block | nothing |
| "transformers" | each spatial transformer | nothing |
| "attention" | each attention layer (projections, attention, output) | nothing |
| "blocks_saving_dots" | each block | the outputs of matmuls without batch dimensions (the dense layers; `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) |
| "blocks_saving_names" | each block | the outputs of its resnets and transformers (`SAVED_NAMES`) |

Why not plain `jax.checkpoint` (`nn.remat`): it marks the recomputation
with optimisation barriers, and XLA:CPU removes those before its
optimisations, so CSE folds the recomputation back into the forward pass
and the compiled step keeps every activation anyway (measured:
benchmarks/README.md). The formulation CPU keeps: a custom VJP whose
forward pass saves only what the policy saves (`nn.vjp` of the
checkpointed function) and whose backward pass recomputes from residuals
tied to the incoming gradient (each plus `0 * d_out[0]`, which XLA cannot
fold for floats; `tied_gradient.tie`). Its operands differ from the
forward pass's, so CSE has nothing to merge, and it depends on the
gradient, so it cannot be scheduled before the backward pass reaches it:
one block's activations are live at a time. The parameters stay untied
(a tied copy of each would be live through its block's backward pass);
the convolutions' own backward passes (`tied_gradient.Conv`) keep their
kernel transposes from being built early instead. A block computing in
another dtype than its parameters (bf16 over f32) has them tied all the
same: its layers cast them, and tied the cast is made anew in the
compute dtype (SD-1.5 LoRA at bf16 with remat: 3.64 GB of temporaries
against 4.13 GB untied).
(The first version recomputed inside a `lax.cond` on the
gradient; XLA:CPU leaves the convolutions of a conditional's branches out
of its canonical form, and their weight gradients ran 3x slower.) GPUs
keep the barriers; there `nn.remat` with the same policy is used.
"""
import contextlib
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models import tied_gradient

# policy -> (the layer it recomputes, what it keeps there; None = nothing)
SAVED_NAMES = ("resnet_out", "transformer_out")


_POLICIES = {
    "none": (None, None),
    "blocks": ("blocks", None),
    "transformers": ("transformers", None),
    "attention": ("attention", None),
    "blocks_saving_dots": (
        "blocks", jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "blocks_saving_names": (
        "blocks", jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)),
}
POLICIES = tuple(_POLICIES)


def call(module, *args):
  """module(*args): the function of (module, *args) most layers are."""
  return module(*args)


# The traced values method interceptors close over, registered by their
# owners (`closure_inputs`, used by `lora.apply_with_adapters`): the CPU
# recomputation below takes them as explicit inputs, since a custom VJP
# cannot close over values being differentiated.
_CLOSURES = threading.local()


def _closures() -> list:
  if not hasattr(_CLOSURES, "stack"):
    _CLOSURES.stack = []
  return _CLOSURES.stack


@contextlib.contextmanager
def closure_inputs(get: Callable[[], Any], put: Callable[[Any], None]):
  """Declares, for the duration, what an interceptor pushed alongside reads
  from its closure: get() returns the pytree of arrays, put(tree) makes the
  interceptor read `tree` instead. Under one interceptor so declared (LoRA),
  remat on CPU passes the tree through its custom VJP and swaps it in while
  the checkpointed function is traced; under any undeclared interceptor it
  falls back to plain checkpointing."""
  _closures().append((get, put))
  try:
    yield
  finally:
    _closures().pop()


def _interceptors() -> int:
  """How many Flax method interceptors are active."""
  from flax.linen import module as module_lib  # pylint: disable=g-import-not-at-top
  return len(module_lib._global_interceptor_stack)  # pylint: disable=protected-access


def _with_closure_inputs(fn: Callable, closures) -> Callable:
  """fn(mdl, *args) as a function of (mdl, values, *args) that reads the
  closures' values from its `values` argument."""
  def wrapped(mdl, values, *args):
    saved = [get() for get, _ in closures]
    for (_, put), value in zip(closures, values):
      put(value)
    try:
      return fn(mdl, *args)
    finally:
      for (_, put), value in zip(closures, saved):
        put(value)
  return wrapped


@jax.tree_util.register_static
class _Static:
  """A residual of structure only (which residuals stay untied)."""

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return hash(self.value)

  def __eq__(self, other):
    return isinstance(other, _Static) and self.value == other.value


def _recompute_after_gradient(fn: Callable, saveable, module, *args):
  """fn(module, *args) with a custom VJP that saves what `saveable` keeps
  and recomputes the rest from residuals tied to the incoming gradient.

  The backward pass adds `0 * d_out[0]` to every floating residual but
  the module's variables (the inputs, the closure inputs, what the policy
  saved) before recomputing: XLA does not fold a float times zero (NaN and
  infinity), so the recomputation's operands differ from the forward
  pass's (no CSE) and nothing of it can run before the backward pass
  reaches it. It stays in the step's main computation, where XLA:CPU turns
  the weight-gradient convolutions into its fast canonical form; inside a
  conditional's branches it does not, and those ran 3x slower
  (benchmarks/README.md, "Remat recomputed in the main computation").
  Tying the parameters too cost a copy of the largest block's (SD-1.5
  LoRA: 1.94 GB of temporaries against 1.14 GB untied with
  `tied_gradient`'s layers; benchmarks/README.md, "Operands tied to the
  incoming gradient")."""
  checkpointed = nn.checkpoint(fn, policy=saveable, prevent_cse=False)

  def forward(mdl, *inputs):
    out, pullback = nn.vjp(checkpointed, mdl, *inputs)
    # The pullback's residuals that are the module's own variables, by
    # identity (jax forwards an input that is a residual as itself). Those
    # its layers cast to another compute dtype (`mdl.dtype`) are tied all
    # the same: tied, the recomputation's cast is a new op, made (in the
    # compute dtype) when the block's gradient exists; untied, CSE would
    # hand it the forward pass's cast, live from the forward pass on.
    compute = getattr(mdl, "dtype", None)
    own = {id(leaf) for leaf in jax.tree_util.tree_leaves(mdl.variables)
           if compute is None or not _cast_to(leaf, compute)}
    untied = tuple(id(leaf) in own
                   for leaf in jax.tree_util.tree_leaves(pullback))
    return out, (pullback, _Static(untied))

  def backward(residuals, d_out):
    pullback, untied = residuals
    leaves, treedef = jax.tree_util.tree_flatten(pullback)
    leaves = [leaf if keep else tied_gradient.tie(leaf, d_out)
              for leaf, keep in zip(leaves, untied.value)]
    return jax.tree_util.tree_unflatten(treedef, leaves)(d_out)

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)(
      module, *args)


def _cast_to(leaf, dtype) -> bool:
  """Whether a layer computing in `dtype` casts this floating variable."""
  return (jnp.issubdtype(leaf.dtype, jnp.floating)
          and jnp.dtype(dtype) != leaf.dtype)


def remat_call(policy: str, layer: str, fn: Callable, module: nn.Module,
               *args):
  """fn(module, *args), recomputed in the backward pass if `policy`
  checkpoints `layer` ("blocks", "transformers" or "attention").

  The parameter tree is the same either way: `module` keeps its name.
  """
  where, saveable = _POLICIES[policy]
  if where != layer:
    return fn(module, *args)
  saveable = saveable or jax.checkpoint_policies.nothing_saveable
  closures = list(_closures())
  if jax.default_backend() != "cpu" or _interceptors() != len(closures):
    # GPUs keep the barriers. Under an interceptor that did not declare its
    # closure (`closure_inputs`), plain checkpointing is the correct
    # choice, though XLA:CPU may fold its recomputation back.
    return nn.checkpoint(fn, policy=saveable)(module, *args)
  if not closures:
    return _recompute_after_gradient(fn, saveable, module, *args)
  values = [get() for get, _ in closures]
  return _recompute_after_gradient(_with_closure_inputs(fn, closures),
                                   saveable, module, values, *args)
