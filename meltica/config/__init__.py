"""Configuration: one YAML file per environment, ``MELTICA_*`` overrides, validated before anything starts."""

from meltica.config.loader import (
    ENV_SELECTOR,
    environment_file,
    load_settings,
    mask_url,
    masked_settings,
    read_config_file,
    unsafe_settings,
)
from meltica.config.settings import (
    ENVIRONMENTS,
    AccountConfig,
    KafkaSettings,
    MelticaSettings,
    RiskLimits,
)

__all__ = [
    "ENVIRONMENTS",
    "ENV_SELECTOR",
    "AccountConfig",
    "KafkaSettings",
    "MelticaSettings",
    "RiskLimits",
    "environment_file",
    "load_settings",
    "mask_url",
    "masked_settings",
    "read_config_file",
    "unsafe_settings",
]
