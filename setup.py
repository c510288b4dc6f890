# cffi's `cffi_modules` still needs setup.py: it compiles helper/csrc into img_helper._native at install time.
from setuptools import setup

setup(cffi_modules=["helper/native_build.py:ffibuilder"])
