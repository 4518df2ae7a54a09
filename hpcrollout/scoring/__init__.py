"""Scoring rollouts: verifiers (verifiers.py), the process pool that runs them with hard timeouts (pool.py),
the streaming ``hpcrollout score`` stage (score.py), and pass@k / maj@n / solve rates / selection (metrics.py)."""
