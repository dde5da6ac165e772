"""Configuration of a marginal-likelihood tuning run.

The same nested structure is used by the Hydra CLI (YAML files under ``marglik/conf/``, one
config group per section) and by the Python API (:class:`Config`). ``Config.from_dict`` accepts
the plain dictionary Hydra produces (``OmegaConf.to_container(cfg, resolve=True)``) and rejects
unknown keys, so a typo in an override fails loudly instead of being ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from ..augment import ALL_GENERATORS


@dataclass
class DataConfig:
    """``data`` group: which data set and its invariance benchmark options."""

    name: str = "digits"  #: digits | mnist | fashion_mnist | cifar10
    root: str = "data"  #: folder of the torchvision files
    download: bool = False
    train_size: Optional[int] = None  #: random training subset (None: all)
    rotation: float = 0.0  #: degrees; each image rotated by a fixed angle in [-rotation, rotation]
    translation: float = 0.0  #: pixels; fixed per-image shift in [-translation, translation]
    upsample: Optional[int] = None  #: resize images to upsample x upsample first
    seed: int = 0  #: seeds the subset and the fixed per-image warps (not the training)


@dataclass
class ModelConfig:
    """``model`` group: a name for :func:`marglik.models.get_model` plus constructor kwargs."""

    name: str = "cnn"  #: cnn | mlp | wrn16_4 (| vit)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CurvatureConfig:
    """``curvature`` group: the K-FAC Laplace approximation used for the marginal likelihood."""

    approx: str = "reduce"  #: expand | reduce (positions inside one image: pixels)
    copies_approx: str = "reduce"  #: expand | reduce (the S augmented copies; reduce: models average over them)
    fisher_type: str = "type-2"  #: type-2 | mc | empirical
    mc_samples: int = 1


@dataclass
class HyperConfig:
    """``hyper`` group: the outer loop (Immer et al. 2021, Algorithm 1)."""

    prior_structure: str = "layerwise"  #: scalar | layerwise
    prior_prec_init: float = 1.0
    lr: float = 0.1  #: Adam lr of the log prior precision
    aug_lr: float = 0.1  #: Adam lr of the augmentation ranges eta
    steps: int = 2  #: K hypersteps per marglik update
    frequency: int = 1  #: F: a marglik update every F epochs (after burn-in)
    burn_in: int = 5  #: epochs of MAP training before the first marglik update
    schedule: str = "constant"  #: constant | cosine (hyper lrs over the epochs after burn-in)
    augmentation: bool = True  #: learn affine augmentation ranges
    n_samples: int = 8  #: S augmented copies per image (training and marglik)
    n_samples_test: Optional[int] = None  #: S at test time (None: n_samples)
    generators: List[str] = field(default_factory=lambda: list(ALL_GENERATORS))
    marglik_batches: Optional[int] = 4  #: batches per Laplace fit (None: the whole training set)
    marglik_batch_size: Optional[int] = 128  #: batch size of the Laplace fit (None: trainer.batch_size)


@dataclass
class TrainerConfig:
    """``trainer`` group: the MAP training of the network weights."""

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-2
    lr_min: float = 1e-6  #: final lr of the cosine schedule
    schedule: str = "cosine"  #: cosine | constant (MAP lr, per optimizer step)
    optimizer: str = "adam"  #: adam | sgd
    momentum: float = 0.9  #: sgd only
    device: str = "auto"  #: auto | cpu | cuda | cuda:<i>
    seed: int = 0
    num_threads: Optional[int] = None  #: torch.set_num_threads (None: torch's default)
    eval_every: int = 1  #: test metrics every this many epochs (0: only at the end)
    eval_batch_size: int = 256
    final_model: str = "best"  #: best (best-marglik checkpoint) | last: the model the summary reports
    max_rollbacks: int = 10  #: give up after this many non-finite losses / marglik values
    rollback_lr_factor: float = 0.5  #: multiply the offending lr by this after a rollback
    resume: Optional[str] = "auto"  #: auto | never | <path of a run dir or a checkpoint file>
    progress: bool = True


@dataclass
class LoggerConfig:
    """``logger`` group: Weights & Biases. ``WANDB_MODE`` in the environment wins over ``mode``."""

    mode: str = "offline"  #: offline | online | disabled
    project: str = "marglik"
    group: Optional[str] = None  #: None: data/model/augmentation/prior, so expand vs reduce share a group
    name: Optional[str] = None  #: None: "<approx>-<copies_approx>-s<seed>"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "curvature": CurvatureConfig,
    "hyper": HyperConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


@dataclass
class Config:
    """A full run configuration; see the section classes for the fields."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]] = None, **overrides: Dict[str, Any]) -> "Config":
        """Build from a nested dict (e.g. Hydra's); keys other than the six sections are ignored
        (Hydra adds its own), unknown keys *inside* a section raise ``ValueError``.

        ``model`` accepts either ``{"name": ..., "kwargs": {...}}`` or a flat dict whose keys other
        than ``name`` are constructor kwargs. ``overrides`` are merged per section, e.g.
        ``Config.from_dict(trainer={"epochs": 3})``.
        """
        d = dict(d or {})
        for key, val in overrides.items():
            d[key] = {**dict(d.get(key) or {}), **val}
        sections = {}
        for key, klass in _SECTIONS.items():
            raw = dict(d.get(key) or {})
            if key == "model" and "kwargs" not in raw:
                raw = {"name": raw.pop("name", "cnn"), "kwargs": raw}
            names = {f.name for f in fields(klass)}
            unknown = sorted(set(raw) - names)
            if unknown:
                raise ValueError(f"unknown {key} option(s) {unknown}; known: {sorted(names)}")
            sections[key] = klass(**raw)
        cfg = cls(**sections)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def replace(self, **sections: Dict[str, Any]) -> "Config":
        """A copy with some fields of some sections replaced: ``cfg.replace(trainer={"epochs": 2})``."""
        return Config.from_dict(self.to_dict(), **sections)

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        c, h, t = self.curvature, self.hyper, self.trainer
        check(c.approx in ("expand", "reduce"), f"curvature.approx must be expand|reduce, got {c.approx!r}")
        check(c.copies_approx in ("expand", "reduce"),
              f"curvature.copies_approx must be expand|reduce, got {c.copies_approx!r}")
        check(c.fisher_type in ("type-2", "mc", "empirical"),
              f"curvature.fisher_type must be type-2|mc|empirical, got {c.fisher_type!r}")
        check(h.prior_structure in ("scalar", "layerwise"),
              f"hyper.prior_structure must be scalar|layerwise, got {h.prior_structure!r}")
        check(h.schedule in ("constant", "cosine"), f"hyper.schedule must be constant|cosine, got {h.schedule!r}")
        check(t.schedule in ("constant", "cosine"), f"trainer.schedule must be constant|cosine, got {t.schedule!r}")
        check(t.optimizer in ("adam", "sgd"), f"trainer.optimizer must be adam|sgd, got {t.optimizer!r}")
        check(t.final_model in ("best", "last"), f"trainer.final_model must be best|last, got {t.final_model!r}")
        check(self.logger.mode in ("offline", "online", "disabled"),
              f"logger.mode must be offline|online|disabled, got {self.logger.mode!r}")
        check(h.steps >= 1 and h.frequency >= 1 and h.burn_in >= 0, "hyper.steps, hyper.frequency >= 1; burn_in >= 0")
        check(h.n_samples >= 1, "hyper.n_samples must be >= 1")
        check(h.marglik_batches is None or h.marglik_batches >= 1, "hyper.marglik_batches must be >= 1 or null")
        check(h.prior_prec_init > 0, "hyper.prior_prec_init must be positive")
        check(0 < t.rollback_lr_factor <= 1, "trainer.rollback_lr_factor must be in (0, 1]")
        check(t.epochs >= 0 and t.batch_size >= 1, "trainer.epochs >= 0 and trainer.batch_size >= 1")
        unknown = [g for g in h.generators if g not in ALL_GENERATORS]
        check(not unknown, f"unknown hyper.generators {unknown}; choose from {list(ALL_GENERATORS)}")

    # settings that may differ between an interrupted run and its resumption
    RESUME_FREE = ("trainer.resume", "trainer.device", "trainer.progress", "trainer.num_threads",
                   "trainer.max_rollbacks", "trainer.rollback_lr_factor", "logger")

    def resume_diff(self, other: Dict[str, Any]) -> List[str]:
        """Dotted keys whose values differ from ``other`` (a saved ``to_dict()``), ignoring
        :attr:`RESUME_FREE`."""
        out = []
        mine = _flatten(self.to_dict())
        theirs = _flatten(other)
        for key in sorted(set(mine) | set(theirs)):
            if any(key == f or key.startswith(f + ".") for f in self.RESUME_FREE):
                continue
            if mine.get(key, "<missing>") != theirs.get(key, "<missing>"):
                out.append(f"{key}: checkpoint {theirs.get(key, '<missing>')!r} vs now {mine.get(key, '<missing>')!r}")
        return out


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


__all__ = [
    "Config", "DataConfig", "ModelConfig", "CurvatureConfig", "HyperConfig", "TrainerConfig", "LoggerConfig",
]
