"""jaxsd-sample's prompts: from flags and from a file. Sampling from a
checkpoint: tests/e2e/test_sample.py."""
from jaxsd.diffusion import sample_run as sample


def test_prompts_file(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a photograph of the number 1\n\na photograph of the "
                  "number 2\n")
  assert sample.read_prompts(["x"], str(path)) == [
      "x", "a photograph of the number 1", "a photograph of the number 2"]
