"""The data.* section of a run's config: its valid ranges.

Reads no data: the source is checked by name (its registry names the
choices); a source's own fields (data.path, data.name, ...) are checked when
it opens (`sources.make_source`), with a message naming the field.
"""
from jaxsd.checks import check_choice, check_float, check_int, wrapped
from jaxsd.data import buckets
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
  wrapped("data.background", transforms.parse_color,
          d.get("background", "white"))
  fraction = check_float("data.holdout_fraction",
                         d.get("holdout_fraction", 0.0), 0.0, 0.5,
                         hint="the share of an image folder held out")
  if fraction > 0 and d.source != "imagefolder":
    raise ConfigError(
        f"data.holdout_fraction={fraction} holds out part of an image folder "
        f"only; data.source={d.source!r} has its own splits: set it to 0 and "
        "name the held-out split in eval.reference_split.")
  check_buckets(config)


def check_buckets(config):
  """data.buckets' form, its bound and what it cannot work with; the sides
  against the model's downsampling: models/checks.py check_bucket_sides."""
  d = config.data
  check_float("data.bucket_max_aspect", d.get("bucket_max_aspect", 2.0), 1.0,
              hint="long side / short side of the 'auto' buckets")
  check_int("data.max_buckets", d.get("max_buckets", 32), 1,
            hint="each bucket shape compiles its own train step")
  parsed = wrapped("data.buckets", buckets.parse, d.get("buckets", "off"))
  if parsed is None:
    return
  if parsed != buckets.AUTO and len(parsed) > d.get("max_buckets", 32):
    raise ConfigError(
        f"data.buckets lists {len(parsed)} buckets, more than "
        f"data.max_buckets={d.get('max_buckets', 32)} (each compiles its own "
        "train step); list fewer or raise data.max_buckets.")
  if issubclass(sources.source_class(d.source), sources.StreamSource):
    raise ConfigError(
        f"data.buckets={d.buckets!r} needs a random-access source, not the "
        f"streamed data.source={d.source!r} (the processes must agree on "
        "each batch's bucket); set data.buckets='off'.")
  steps = config.training.steps_per_call
  if steps != 1:
    raise ConfigError(
        f"training.steps_per_call={steps} stacks batches of one shape, but "
        f"data.buckets={d.buckets!r} gives batches of several shapes; set "
        "training.steps_per_call=1 with buckets.")


def check_no_buckets(config, why: str):
  """Refuses data.buckets where a run cannot use it (`why` says which)."""
  value = config.data.get("buckets", "off")
  if wrapped("data.buckets", buckets.parse, value) is not None:
    raise ConfigError(f"data.buckets={value!r}: {why}; set "
                      "data.buckets='off'.")
