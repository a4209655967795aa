"""One typed configuration for a megaloop run, loaded from YAML with `section.key=value` overrides.

The config is a tree of dataclasses. `load_config` reads the YAML file, applies command-line overrides,
converts every value to the field's declared type and validates the whole tree up front, so a bad
config fails before any process group or model is built, with a message that names the fields.
Nothing here is global: the returned object is passed explicitly to whatever needs it.

schema      the dataclasses (ModelConfig, LoopScheduleConfig, DataConfig, TrainConfig, ParallelConfig, InitConfig,
            Config),
            the architecture / injection / mixer names, ConfigError
loading     load_config, config_from_dict, save_config: strict YAML, overrides, type conversion
validation  validate (every static check lives here), NUMERIC_RANGES, tensor_parallel_problems
"""
from megaloop.config.schema import (ARCHITECTURES, FLT_FAMILY, INJECTIONS, MIXER_NAMES, Config, ConfigError,
                                    DataConfig, InitConfig, LoopScheduleConfig, ModelConfig, ParallelConfig,
                                    TrainConfig, mixer_pattern)
from megaloop.config.loading import config_from_dict, load_config, read_config_yaml, save_config
from megaloop.config.validation import NUMERIC_RANGES, tensor_parallel_problems, validate

__all__ = ["ARCHITECTURES", "FLT_FAMILY", "INJECTIONS", "MIXER_NAMES", "Config", "ConfigError", "DataConfig",
           "InitConfig", "LoopScheduleConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "mixer_pattern",
           "config_from_dict", "load_config", "read_config_yaml", "save_config", "NUMERIC_RANGES",
           "tensor_parallel_problems", "validate"]
