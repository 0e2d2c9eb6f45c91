"""Homomorphic encryption for HE-LoRA: CKKS parameters, backends (own kernels, OpenFHE), and the
key-holder / evaluator roles. Imports without torch: a key holder can be a thin client."""
