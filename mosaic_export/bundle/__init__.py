"""The output folder: built atomically, the typed report and its renderings (report.md, plots, manifest,
the app README), verify."""
