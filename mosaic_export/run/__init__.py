"""Jobs: the main run (pipeline), the sweep, profile detect, generation; the run configuration; executors
(local, Ray)."""
