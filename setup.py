"""unsegment: UAD (CVPR 2024) image protection against Segment Anything.

The warp_kernel extension is not compiled here: it builds on first use (JIT, cached), or ahead
of time with `python -m warp_kernel.build`, and falls back to PyTorch when no compiler is found.
So installing never needs a compiler.
"""

from setuptools import setup

setup(
    name="unsegment",
    version="0.1.0",
    description="Unsegment Anything by Simulating Deformation: protect images against SAM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    py_modules=["uad", "eval"],
    packages=["unsegment", "warp_kernel"],
    package_data={"warp_kernel": ["csrc/*.h", "csrc/*.cuh", "csrc/*.cpp", "csrc/*.cu"]},
    install_requires=["torch", "torchvision", "segment-anything", "numpy", "pillow", "ninja"],
    extras_require={
        # scikit-image and scikit-learn: the photos they ship, for benchmarks/composites.py
        "test": ["pytest", "scikit-image", "scikit-learn"],
        # the model families eval.py scores beyond segment-anything (see README.md's model table):
        # SAM 2 / 2.1, SAM-HQ and MobileSAM (both import timm without declaring it), FastSAM
        # (ultralytics, AGPL-3.0, imported only when asked for). sam2 compiles from source: set
        # SAM2_BUILD_CUDA=0 to skip its optional CUDA extension. SAM 3 (SAM License) imports psutil
        # and triton without declaring them (triton comes with torch's Linux CUDA wheels) and
        # fills mask holes with scikit-image on the CPU; none of them pins torch.
        "variants": [
            "sam2>=1.1.0",
            "segment-anything-hq>=0.3",
            "mobilesam-mirror>=1.0.0",
            "timm",
            "ultralytics>=8.4.190",
            "sam3>=0.1.4",
            "psutil",
            "scikit-image",
        ],
    },
    entry_points={"console_scripts": ["unsegment=unsegment.cli:run", "unsegment-eval=eval:main"]},
)
