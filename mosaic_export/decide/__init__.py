"""Decisions: what a plan costs (cost model, pricing), how good it will be (quality model), the least
pruning that meets the budgets, the joint search, the verdict."""
