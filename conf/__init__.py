"""TenSafe's Hydra config tree (`pkg://tensafe.conf`), and the resolvers its files use.

Importing this package, which Hydra does to find the files, registers the resolvers.
"""

from omegaconf import OmegaConf


def _unless_set(other, default):
    """`${tensafe.unless_set:${a.key},D}`: D while a.key is null, null once the user sets a.key."""
    return default if other is None else None


if not OmegaConf.has_resolver("tensafe.unless_set"):
    OmegaConf.register_new_resolver("tensafe.unless_set", _unless_set)
