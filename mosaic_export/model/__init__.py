"""The model: architectures (one table), loading, streamed weights, resizing, the checkpoint."""
