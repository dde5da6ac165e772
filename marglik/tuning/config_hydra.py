"""Hydra's view of the tuning config: the root schema node the CLI composes and its registration in
Hydra's ``ConfigStore`` (the schema ``marglik_schema``, the ``data`` options
``digits|mnist|fashion_mnist|cifar10``, the ``model`` options ``cnn|mlp|wrn16_4|vit|tv``) with the
``bias_suffix`` resolver of the run directory's name.

The defaults themselves are the dataclasses of :mod:`marglik.tuning.config` (which registers them
on import); YAML under ``marglik/conf`` holds only variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .choices import DataName
from .config import MODEL_SCHEMAS, CurvatureConfig, DataConfig, HyperConfig, LoggerConfig, TrainerConfig


def _curvature_unresolved() -> CurvatureConfig:
    """The ``curvature`` defaults with ``fisher_type`` left ``null``: it resolves from the composed
    ``curvature.backend`` (:class:`~marglik.tuning.config.CurvatureConfig`), not from the default one."""
    c = CurvatureConfig()
    c.fisher_type = None
    return c


@dataclass
class HydraSchema:
    """The root node the CLI composes (``marglik_schema`` in the ConfigStore); ``model`` is filled
    by the ``model`` group with one of :data:`MODEL_SCHEMAS`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    curvature: CurvatureConfig = field(default_factory=_curvature_unresolved)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Register the schema, the ``data`` and the ``model`` options in Hydra's ConfigStore, and the
    ``bias_suffix`` resolver of the run directory's name (idempotent; done on import of this module)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # the run directory's name says when the blocks are separate: ${bias_suffix:${curvature.separate_bias}}
    OmegaConf.register_new_resolver("bias_suffix", lambda v: "-sepbias" if str(v).lower() == "true" else "",
                                    replace=True)
    cs = ConfigStore.instance()
    cs.store(name="marglik_schema", node=HydraSchema)
    for name in DataName:
        cs.store(group="data", name=name.value, node=DataConfig(name=name))
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="model", name=name, node=schema)

