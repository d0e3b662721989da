"""imagegen: shared contract, settings and command line of the image-generation service."""

__version__ = "0.1.0"
