"""Diffusion maths: noise schedules, training losses and samplers (pure JAX, no I/O)."""
