"""Builds src/vnni_ops.c into the package as a shared library onnxruntime loads (not a Python module).

It is compiled for the CPU that builds it (-march=native), as llama.cpp's and llama-cpp-python's source builds
are: the kernels use AVX-512 VNNI where the compiler may, and plain C loops elsewhere; dsedge uses the library
only where dsedge_kernels.supported() says this CPU has the instructions. A wheel for other machines would
need per-function target attributes and a runtime dispatch instead (not done: this package is built where it
runs). setuptools' Extension is used for its compiler handling; the file has no PyInit function and is never
imported."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dsedge_kernels._vnni_ops", sources=["src/vnni_ops.c"], depends=["src/ort_abi.h"],
                             extra_compile_args=["-O3", "-march=native"], libraries=["m"])])
