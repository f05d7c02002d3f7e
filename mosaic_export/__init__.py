"""mosaic-export: fit decoder-only LLMs to devices by composite projection pruning."""

__version__ = "0.1.0"
