"""Array kernels for RNS-CKKS (NumPy on CPU, CuPy on GPU); imported as tensafe.kernels.

No CKKS knowledge lives here: only ring arithmetic written once for `xp` = NumPy or CuPy.
"""
