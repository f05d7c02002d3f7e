"""The foundation: the one user error, units, text sources. Imports nothing of the project."""
