"""Hydra configs of the ``marglik`` CLI (a package so Hydra finds them in any install).

The defaults are the typed dataclasses of :mod:`marglik.tuning.config`, registered in Hydra's
ConfigStore on import; the YAML files here are variants only.
"""

from ..tuning.config import register_configs

register_configs()
