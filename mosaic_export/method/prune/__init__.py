"""Pruning methods: unstructured (Wanda, SparseGPT) and structured (heads, MLP channels).

Each file is pure tensor math on one weight matrix and its calibration statistics; ``apply``
runs them over a model according to a Plan.
"""
