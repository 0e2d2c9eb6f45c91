"""The remote training service (task=service): the Tinker protocol, DP-SGD enforced by the server."""
