"""creditlab: fine-grained credit assignment for RL of language models.

    from creditlab import RolloutBatch, Credit, estimator, get_estimator, list_estimators
"""

from creditlab.batch import Credit, RolloutBatch
from creditlab.registry import estimator, get_estimator, list_estimators

__all__ = ["Credit", "RolloutBatch", "estimator", "get_estimator", "list_estimators"]
__version__ = "0.1.0"
