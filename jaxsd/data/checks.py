"""The data.* section of a run's config: its valid ranges.

Reads no data: the source is checked by name (its registry names the
choices); a source's own fields (data.path, data.name, ...) are checked when
it opens (`sources.make_source`), with a message naming the field.
"""
from jaxsd.checks import check_choice, check_float, check_int, wrapped
from jaxsd.data import sources
from jaxsd.data import transforms
from jaxsd.errors import ConfigError


def check_data(config):
  """data.*: the source's name, the image geometry and the loader's knobs."""
  d = config.data
  wrapped("data.source", sources.source_class, d.source)  # names choices
  check_int("data.image_size", d.image_size, 1)
  check_choice("data.num_channels", d.num_channels, (1, 3),
               hint="1 = grey, 3 = RGB")
  if d.crop not in transforms.CROPS:
    raise ConfigError(f"data.crop={d.crop!r}; choose one of "
                      f"{transforms.CROPS}.")
  check_int("data.workers", d.workers, 0,
            hint="0 decodes in the training process")
  check_int("data.shuffle_buffer", d.shuffle_buffer, 1)
  check_int("data.cycle_length", d.cycle_length, 1)
  check_float("data.max_skipped_fraction", d.max_skipped_fraction, 0.0, 1.0)
