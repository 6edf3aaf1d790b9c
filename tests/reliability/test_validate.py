"""Item 12's mechanism: validation lives in the typed configs, one `validate()` per section, run generically."""

from dataclasses import dataclass, field

import pytest

from creditlab.registry import get_spec, list_estimators
from creditlab.train.checks import check_estimator
from creditlab.train.config import SFTConfig, TrainConfig, at_least


def test_defaults_are_valid():
    TrainConfig().validate()
    SFTConfig().validate()


@pytest.mark.parametrize("name", list_estimators())
def test_every_estimator_accepts_its_own_defaults(name):
    check_estimator(name, dict(get_spec(name).defaults))  # the dry run never refuses a valid setting


@dataclass
class FutureConfig:
    """What another family's section looks like: its own fields, its own validate()."""

    future_samples: int = 4  # e.g. --future-samples
    future_rate: float = 0.5

    def validate(self) -> None:
        at_least(self, future_samples=1)


@dataclass
class ExtendedConfig(TrainConfig):
    future: FutureConfig = field(default_factory=FutureConfig)


def test_a_new_section_is_validated_without_touching_train_config():
    ExtendedConfig().validate()
    with pytest.raises(ValueError, match=r"^--future-samples must be >= 1, got 0$"):
        ExtendedConfig(future=FutureConfig(future_samples=0)).validate()
    with pytest.raises(ValueError, match=r"^--future-rate must be a finite number, got nan$"):  # generic checks too
        ExtendedConfig(future=FutureConfig(future_rate=float("nan"))).validate()
    with pytest.raises(ValueError, match=r"^--future-samples must be int, got 'many'$"):
        ExtendedConfig(future=FutureConfig(future_samples="many")).validate()


def test_types_are_checked_for_library_callers_too():
    cfg = TrainConfig()
    cfg.optim.loss_agg = "bogus"
    with pytest.raises(ValueError, match="--loss-agg must be one of"):
        cfg.validate()
    cfg = TrainConfig()
    cfg.log.tensorboard = "no"
    with pytest.raises(ValueError, match="--tensorboard must be bool"):
        cfg.validate()
