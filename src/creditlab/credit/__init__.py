"""Credit estimators. Importing this package registers every built-in estimator.

One module per family (see design/ARCHITECTURE.md).
"""

from creditlab.credit import (  # noqa: F401  (registration)
    agent,
    attention,
    budget,
    macro,
    outcome,
    planning,
    process,
    segment,
    tree,
)
