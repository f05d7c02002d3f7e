"""mosaic-export: fit decoder-only LLMs to devices by composite projection pruning."""

from mosaic_export.core.version import __version__

__all__ = ["__version__"]
