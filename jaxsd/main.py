"""The training command: `python -m jaxsd.main --config=... --workdir=...`.

The same as `jaxsd-train` (jaxsd/commands/train.py, which holds its flags).
"""
from jaxsd.commands.train import run

if __name__ == "__main__":
  run()
