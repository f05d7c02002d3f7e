"""Built-in hardware profiles (TOML files), shipped as package data. See mosaic_export.profile."""
