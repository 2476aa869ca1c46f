"""ovsam_ray: Open-Vocabulary SAM pre-labelling and training on Ray."""

__version__ = "0.2.0"
