"""Triton kernels, each with its eager twin. Filled by the Triton-kernel work; importable now.

Kernels know nothing of OSRT modules: they take tensors and return tensors.
"""
