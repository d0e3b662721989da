"""imagegen: an HTTP image-generation service. `imagegen.core` is what the gateway (`app`) and
the worker (`worker`) share; `imagegen.cli` is the command line that puts them together."""

__version__ = "0.1.0"
