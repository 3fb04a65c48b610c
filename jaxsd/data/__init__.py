"""Data: sources of captioned images, their transforms, and the resumable loader."""
