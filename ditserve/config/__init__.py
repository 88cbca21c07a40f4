"""EngineConfig, built once at the edge and passed down. env.py alone reads os.environ."""

from ditserve.config.engine import (AccelConfig, EngineConfig, ModelConfig, ParallelConfig, parse_device,
                                    parse_dtype)

__all__ = ["AccelConfig", "EngineConfig", "ModelConfig", "ParallelConfig", "parse_device", "parse_dtype"]
