"""scaleattn: Attention to Scale (Chen et al., CVPR 2016) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="scaleattn",
    version="0.1.0",
    description="Attention to Scale: scale-aware semantic image segmentation in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["scaleattn", "scaleattn.*", "configs"]),  # configs: for installed use (Colab)
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6.0",  # needed by TFDS builders defined outside TFDS
        "tensorflow-cpu>=2.21.0",  # TFDS builders and clu's TensorBoard writer; JAX does all the compute.
        "tensorboard>=2.21.0",
        "array_record>=0.8.6",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "scipy>=1.13",  # SBD's .mat labels
        "pillow>=10.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "torch": ["torch>=2.0"],  # reading torchvision .pth files in scaleattn.convert
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
)
