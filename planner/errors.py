"""Errors the planner raises for impossible requests; each message states the numbers involved."""


class PlanningError(Exception):
    """No plan exists: the model does not fit, f is too large for the cluster, the batch does not divide."""


class ProfileError(Exception):
    """A profile file that is stale (fingerprint mismatch), truncated or malformed."""
