"""mgsr: knowledge distillation of language models with multi-granularity semantic revision."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mgsr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
