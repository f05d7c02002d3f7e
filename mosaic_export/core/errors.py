"""The one error type a user sees: a clear message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (model folder, profile, budget, output path, text file).

    The CLI prints the message alone (no traceback) and exits with code 2.
    """

    exit_code = 2


class Infeasible(UserError):
    """No plan meets the budgets (at one type): the joint search records it and tries the others."""
