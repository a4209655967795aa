"""megaloop: distributed pretraining of looped transformers.

torch is deliberately left unpinned here: GPU users bring the torch build that matches their CUDA
(install it before megaloop). The CPU machines of this project pin torch==2.13.0 in
`scripts/setup_env.sh`, which installs it before this package.
"""
from setuptools import find_packages, setup

setup(
    name="megaloop",
    version="0.1.0",
    description="Distributed pretraining of looped transformers (DeepSpeed ZeRO, TP, PP)",
    packages=find_packages(include=["megaloop", "megaloop.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.19",
        "sentencepiece",
        "numpy",
        "pyyaml",
        "tensorboard",
        "safetensors",
        "tqdm",
        "psutil",
        "tokenizers",  # Hugging Face tokenizer.json files (Llama 3, Qwen, Ouro), fast batched encoding
        "xxhash",  # checkpoint file checksums
    ],
    entry_points={"console_scripts": ["megaloop-pretrain=megaloop.training.cli:main"]},
    extras_require={
        # NVIDIA Apex is never listed: the package index's `apex` is an unrelated project.
        # Apex's fused kernels are used only when a user has built it on their cluster.
        "test": ["pytest", "pytest-timeout"],
        "hf": ["transformers"],
        "eval": ["matplotlib", "lm-eval", "accelerate"],  # eval_loops PNG; eval_harness (lm-eval hf model: accelerate)
        # Corpora as they ship: parquet, .jsonl.zst, `datasets` save_to_disk folders; tiktoken vocabularies.
        "data": ["pyarrow", "zstandard", "datasets", "tiktoken"],
        # Experiment trackers (imported only when named in train.loggers; offline modes work without network).
        "track": ["wandb", "mlflow-skinny"],
    },
)
