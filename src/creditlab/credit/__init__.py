"""Credit estimators. Importing this package registers every built-in estimator.

One module per family (see design/ARCHITECTURE.md).
"""

from creditlab.credit import agent, attention, budget, outcome, planning, process, segment, tree  # noqa: F401
