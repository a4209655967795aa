"""megaloop's data pipeline: tokenizers, Megatron-compatible indexed datasets, sampling and blending."""
