"""Name -> class registries: everything a config chooses by name (sampler,
UNet, evaluation metric, data source) is registered with a decorator where
it is defined, not listed in an if-chain where it is used."""
from typing import Dict, List


class Registry:
  """Classes registered under names, for the config field `config_key`."""

  def __init__(self, kind: str, config_key: str):
    self.kind, self.config_key = kind, config_key
    self._classes: Dict[str, type] = {}

  def register(self, name: str):
    """Class decorator: registers the class as `name` (and sets cls.name)."""
    def wrap(cls):
      if name in self._classes:
        raise ValueError(f"{self.kind.capitalize()} {name!r} is already "
                         "registered.")
      cls.name = name
      self._classes[name] = cls
      return cls
    return wrap

  def unregister(self, name: str) -> None:
    """Removes `name` (a registration made for a test or an experiment)."""
    del self._classes[name]

  def names(self) -> List[str]:
    return sorted(self._classes)

  def get(self, name: str) -> type:
    """The class registered as `name`; a ValueError naming the config field
    and the choices otherwise."""
    if name not in self._classes:
      raise ValueError(f"Unknown {self.kind} {name!r} (config "
                       f"{self.config_key}); choose one of {self.names()}.")
    return self._classes[name]
