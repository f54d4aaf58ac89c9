"""Configs: the schema (`schema.py`: one dataclass per section, with its checks) and loading (`loading.py`:
YAML, overrides, type checks). Import from here."""

from neuroar.config.loading import CONFIG_DIR, DEMO_SCAN_CODING, config_from_dict, load_config, save_config
from neuroar.config.schema import (
                                   BASELINES,
                                   AutoencoderConfig,
                                   BaselineTrainingConfig,
                                   BrainAgeConfig,
                                   Config,
                                   DataConfig,
                                   LDMConfig,
                                   SamplingConfig,
                                   Shape3,
                                   StarGANConfig,
                                   TokenizerConfig,
                                   TokenizerTrainingConfig,
                                   TrainingConfig,
                                   TransformerConfig,
                                   TransformerTrainingConfig,
)

__all__ = ["BASELINES", "CONFIG_DIR", "DEMO_SCAN_CODING", "AutoencoderConfig", "BaselineTrainingConfig",
           "BrainAgeConfig", "Config", "DataConfig", "LDMConfig", "SamplingConfig", "Shape3", "StarGANConfig",
           "TokenizerConfig", "TokenizerTrainingConfig", "TrainingConfig", "TransformerConfig",
           "TransformerTrainingConfig", "config_from_dict", "load_config", "save_config"]
