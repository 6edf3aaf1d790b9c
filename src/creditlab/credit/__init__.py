"""Credit estimators. Importing this package registers every built-in estimator.

One module per family (see design/ARCHITECTURE.md): outcome.py holds the sequence-level baselines and GAE.
"""

from creditlab.credit import outcome  # noqa: F401  (registers grpo, dr_grpo, rloo, reinforce_pp, gae)
