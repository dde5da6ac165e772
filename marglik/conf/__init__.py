"""Hydra configs of the ``marglik`` CLI (a package so Hydra finds them in any install)."""
