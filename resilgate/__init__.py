"""resilgate: the gateway that keeps a hospital working when its systems fail."""

__version__ = "0.1.0"
