"""Array kernels, imported as tensafe.kernels: ring arithmetic for RNS-CKKS (NumPy on CPU, CuPy on
GPU, numba-compiled CPU kernels) and secure aggregation's compiled quantization (`aggregation`).

No CKKS or protocol knowledge lives here: only array arithmetic, each kernel beside its NumPy
reference.
"""
