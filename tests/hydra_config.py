"""Compose the CLI's Hydra config in-process (the tests that run the CLI without a subprocess)."""

from hydra import compose, initialize_config_module


def compose_config(overrides=(), with_hydra: bool = False):
    """The ``marglik`` CLI's config with ``overrides`` (Hydra override strings) applied; with
    ``with_hydra`` it includes Hydra's own node (``cfg.hydra``: run dir, job settings)."""
    with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
