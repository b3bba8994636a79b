"""Build script. Metadata lives in pyproject.toml; this file exists so that the compiled
extension (fused_res._C, added by the C++/CUDA backend) can be built with torch's
BuildExtension when torch is importable. Without it the package is pure Python."""

from setuptools import setup

setup()
