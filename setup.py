"""RobustReID: adversarially robust and domain-generalizable person re-identification on fastreid.

fastreid is deliberately NOT listed in install_requires: fastreid 1.4.0 (the only release on PyPI)
pins torch==1.13.1 / torchvision==0.14.1, which do not exist for Python 3.11, so any package that
requires it makes pip's resolver fail. scripts/setup.sh installs it with --no-deps, and
robustreid.compat adapts it to today's Python/torch/numpy at import time.
"""
from setuptools import find_packages, setup

setup(
    name="robustreid",
    version="0.1.0",
    description="Adversarially robust and domain-generalizable person re-identification for fastreid",
    package_dir={"": "projects/RobustReID"},
    packages=find_packages("projects/RobustReID"),
    python_requires=">=3.10",
    install_requires=["torch>=2.0", "torchvision", "yacs", "numpy", "scipy", "Pillow", "tqdm",
                      "matplotlib", "advertorch==0.2.3",
                      "pytorch-metric-learning==2.9.0"],
    extras_require={
        "cpu": ["faiss-cpu>=1.7.3"],
        "gpu": ["faiss-gpu"],
        "test": ["pytest>=7", "pytest-timeout"],
        "deploy": ["onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.32.0"],
        # tools/robust_eval.py --protocol corruptions; imagecorruptions itself is installed with
        # --no-deps by scripts/setup.sh (it requires opencv-python beside the headless cv2).
        "corruptions": ["scikit-image>=0.21"],
    },
)
