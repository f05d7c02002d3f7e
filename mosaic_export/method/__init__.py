"""The method (Mosaic): calibration, outlier measurement (POD), allocation, the plan, pruning,
compensation, recovery."""
