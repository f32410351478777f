"""Packaging for erpd_megatron: Extreme Region Policy Distillation on megatron-core."""

from setuptools import find_packages, setup

CORE = [
    # 0.16.x is the newest release for Python 3.11; newer releases are admitted on 3.12+.
    "megatron-core>=0.16.1,<0.20",
    # Kept at a range that the CPU wheel 2.13.0 satisfies; the Makefile installs the CPU
    # build explicitly on machines without a GPU so pip never pulls a CUDA build.
    "torch>=2.6",
    "datasets>=2.19",
    "wandb>=0.17",
    "transformers>=4.51",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "math-verify>=0.7",
    "psutil>=5.9",
    "pyyaml>=6.0",
    "numpy>=1.26",
    "pyarrow>=15",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

setup(
    name="erpd_megatron",
    version="0.1.0",
    description="Extreme Region Policy Distillation (ERPD) at Megatron scale",
    packages=find_packages(include=["erpd_megatron", "erpd_megatron.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        # apex is optional and is built from source on clusters (see README).
        # Transformer Engine in the range of the megatron-core pip picks for this Python
        # (core_v0.16.1 pyproject `dev` extra: >=2.9.0a0,<2.12.0; core_v0.19.0 tested with TE
        # v2.17.1). It builds against the installed torch, so install it first with
        # `pip install --no-build-isolation` (the Makefile does); this extra then only checks it.
        "gpu": [
            'transformer-engine[pytorch]>=2.9.0a0,<2.12.0; python_version < "3.12"',
            'transformer-engine[pytorch]>=2.9.0a0,<2.18; python_version >= "3.12"',
        ],
        # vLLM pins an exact torch: install it in its own venv (`make install-vllm`), never
        # next to Transformer Engine.
        "vllm": ["vllm", "pyyaml>=6.0"],
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.5", "zstandard"],  # zstandard: bench_cache
    },
    entry_points={"console_scripts": ["erpd=erpd_megatron.cli:main"]},
)
