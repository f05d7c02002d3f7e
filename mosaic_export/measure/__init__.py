"""Measurement: figures as statistics over interleaved rounds (rounds.py, stats.py), and the
memory of the process tree a run makes, with --max-rss as a limit on it (tree.py)."""
