"""Configuration of a marginal-likelihood tuning run: one typed schema for the CLI and the Python API.

This module holds the *schema*: the section dataclasses and :class:`Config`, the full run config.
It re-exports every name of the modules that do the rest, so ``from marglik.tuning.config import X``
works for all of them.

Where things live
-----------------
* **Defaults**: only in the dataclasses below (``DataConfig``, ``CurvatureConfig``, ``HyperConfig``,
  ``TrainerConfig``, ``LoggerConfig`` and one dataclass per model in :data:`MODEL_SCHEMAS`). They
  are registered in Hydra's ``ConfigStore`` by :func:`~marglik.tuning.config_hydra.register_configs`
  (:mod:`marglik.tuning.config_hydra`: the schema node ``marglik_schema``, the ``data`` options
  ``digits|mnist|fashion_mnist|cifar10`` and the ``model`` options ``cnn|mlp|wrn16_4|vit|tv``; done on
  import of this module), so the CLI composes typed nodes and YAML files under ``marglik/conf`` hold
  only *variants* (``experiment/*.yaml``) and Hydra's own settings (``config.yaml``).
* **Choices** (:mod:`marglik.tuning.choices`) are ``str`` enums (:class:`Choice` subclasses) whose
  member *names equal their values*: Hydra/OmegaConf parse ``curvature.approx=expand`` by member
  name, and ``cfg.curvature.approx == "expand"`` keeps working because the members are strings.
* **Parsing** (:mod:`marglik.tuning.config_parsing`): field types (OmegaConf's merge onto the
  dataclass, plus :func:`~marglik.tuning.config_parsing.strict_types`: booleans are
  ``true``/``false`` only, numbers are not booleans), unknown keys, each model's own keyword
  arguments; the error type and its messages.
* **Checks** (:mod:`marglik.tuning.config_checks`): value ranges and curvature combinations
  (:meth:`Config.validate`), warnings before a run, resumability. Every failure raises
  :class:`ConfigError`, a ``ValueError`` whose message is one line::

      <key>=<value>: <problem>; allowed: <what is allowed>

  e.g. ``trainer.epochs=abc: wrong type; allowed: an integer``. The CLI prints it as
  ``marglik: config error: ...`` and exits with status 2 (``HYDRA_FULL_ERROR=1`` re-raises it
  with its traceback).

Adding a field
--------------
Add ``name: <type> = <default>  #: doc`` to the section dataclass (the ``#:`` comment is the
option's meaning in ``marglik --help``, which lists every field). For a choice, define
``class MyChoice(Choice): a = "a"; b = "b"`` in :mod:`marglik.tuning.choices` (names = values;
values that are not identifiers use the functional form, see :data:`FisherType`) and type the field
``MyChoice`` (``Optional[MyChoice]`` if ``null`` is allowed). Range checks go in
:func:`~marglik.tuning.config_checks.validate_config` as ``check(ok, "section.key", "allowed
text")``. Nothing else (no YAML) needs to change. A new model: a dataclass with
``name: ModelName = ModelName.<name>`` plus its constructor kwargs, an entry in
:data:`MODEL_SCHEMAS` and in :class:`ModelName`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

from ..augment import ALL_GENERATORS
from .backends import CurvatureBackend, CurvatureStructure
from .choices import (
    Activation,
    Approx,
    ApproxRule,
    AugGenerator,
    Choice,
    DataName,
    FactorForm,
    FinalModel,
    FisherType,
    LoggerMode,
    ModelName,
    OptimizerName,
    PriorStructure,
    Schedule,
    WRNNorm,
)
from .config_checks import float_keys, resume_diff, run_warnings, valid_device, validate_config
from .config_parsing import (
    ConfigError,
    describe_type,
    field_type,
    flatten,
    is_interpolation,
    model_kwargs,
    plain,
    resolved_types,
    sections_from_dict,
    show_value,
    strict_types,
    type_problem,
    typed_section,
    unknown_key_error,
)
from .estimator import SelectionEstimator


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """``data`` group: which data set and its invariance benchmark options."""

    name: DataName = DataName.digits  #: the data set (also the group: data=<name>)
    root: str = "data"  #: folder of the torchvision files
    download: bool = False  #: let torchvision download missing files (needs the network)
    train_size: Optional[int] = None  #: random training subset (None: all)
    rotation: float = 0.0  #: degrees; each image rotated by a fixed angle in [-rotation, rotation]
    translation: float = 0.0  #: pixels; fixed per-image shift in [-translation, translation]
    upsample: Optional[int] = None  #: resize images to upsample x upsample first
    seed: int = 0  #: seeds the subset and the fixed per-image warps (not the training)


@dataclass
class CNNConfig:
    """``model=cnn``: :class:`marglik.models.SmallCNN`."""

    name: ModelName = ModelName.cnn
    width: int = 16  #: channels of the first conv (the second has 2 width)
    hidden: int = 64  #: width of the MLP head (0: linear head)


@dataclass
class MLPConfig:
    """``model=mlp``: :class:`marglik.models.MLP` on flattened images."""

    name: ModelName = ModelName.mlp
    hidden: List[int] = field(default_factory=lambda: [128, 128])  #: widths of the hidden layers
    activation: Activation = Activation.tanh  #: of the hidden layers


@dataclass
class WRN16_4Config:
    """``model=wrn16_4``: :class:`marglik.models.WideResNet` with depth 16, widen factor 4."""

    name: ModelName = ModelName.wrn16_4
    norm: WRNNorm = WRNNorm.fixup  #: Fixup scalars, BatchNorm, or no normalisation
    dropout: float = 0.0  #: dropout probability inside the residual blocks


@dataclass
class ViTConfig:
    """``model=vit``: :class:`marglik.models.TorchvisionViT`, torchvision's ``VisionTransformer``
    (``nn.MultiheadAttention``, class token, positional embedding; image size and channels from the
    data). Defaults for 8x8 digits: 2x2 patches -> 16 tokens + class token."""

    name: ModelName = ModelName.vit
    patch_size: int = 2  #: pixels per patch side
    num_layers: int = 2  #: encoder layers
    num_heads: int = 4  #: attention heads
    hidden_dim: int = 32  #: token width
    mlp_dim: int = 64  #: width of the encoder MLPs
    dropout: float = 0.0  #: dropout probability
    attention_dropout: float = 0.0  #: dropout probability on the attention weights


@dataclass
class TVConfig:
    """``model=tv:<arch>`` (``model=tv model.arch=<arch>``): :class:`marglik.models.TorchvisionClassifier`,
    any torchvision classifier by name, random init; channels, image size and classes from the data
    (a stem convolution with the data's channels when they are not 3)."""

    name: ModelName = ModelName.tv
    arch: str = "resnet18"  #: a torchvision classification architecture (torchvision.models.list_models)


#: model name -> the dataclass of its constructor kwargs (plus ``name``).
MODEL_SCHEMAS: Dict[str, Type[Any]] = {
    "cnn": CNNConfig, "mlp": MLPConfig, "wrn16_4": WRN16_4Config, "vit": ViTConfig, "tv": TVConfig,
}


@dataclass
class ModelConfig:
    """``model`` group: a name for :func:`marglik.models.get_model` plus its constructor kwargs.

    ``kwargs`` are checked against the model's schema in :data:`MODEL_SCHEMAS` and completed with
    its defaults (plain Python values, enums as strings).
    """

    name: ModelName = ModelName.cnn
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name, self.kwargs = model_kwargs(self.name, self.kwargs, MODEL_SCHEMAS)


@dataclass
class CurvatureConfig:
    """``curvature``: the K-FAC Laplace approximation used for the marginal likelihood."""

    #: K-FAC flavour on the positions inside an image (pixels, tokens): expand | reduce | auto (expand on
    #: convolutions, reduce on the other layers: reduce's cost on transformers, expand's invariance signal on CNNs)
    approx: ApproxRule = ApproxRule.reduce
    #: per-layer overrides of approx: {module name (covers its submodules) or type name: expand|reduce|auto},
    #: e.g. {features.0:expand}
    approx_layers: Dict[str, ApproxRule] = field(default_factory=dict)  # type: ignore[valid-type]
    #: exact GGN factors (type-2), the Hessian's root times random signs (mc-root: one backward pass, unbiased
    #: for the GGN and its derivative w.r.t. augmentation ranges), sampled labels (mc: unbiased for the GGN, not
    #: its derivative: it rewards ranges the data do not support), or the empirical Fisher; null: mc-root with
    #: backend=marglik, mc with a laplace-torch backend (which has no mc-root)
    fisher_type: Optional[FisherType] = None  # type: ignore[valid-type]
    mc_samples: int = 1  #: samples (labels or sign vectors) per output for fisher_type=mc / mc-root
    copies_approx: Optional[Approx] = Approx.reduce  #: K-FAC flavour on the augmented copies of an image (null: as approx)
    #: who computes the curvature: marglik's own K-FAC, or a laplace-torch peer (marglik.tuning.backends)
    backend: CurvatureBackend = CurvatureBackend.marglik
    structure: CurvatureStructure = CurvatureStructure.kron  #: Kronecker-factored or diagonal (diag: peers only)
    #: Kronecker blocks of a layer with a bias: false = one joint [W, b] block (K-FAC with
    #: bias-augmented inputs), true = separate W and b blocks (laplace-torch's structure); null =
    #: the backend's own (false for marglik; laplace-torch's peers are always separate, so false
    #: with a peer is an error)
    separate_bias: Optional[bool] = None
    #: auto: factors from at most half their dimension in rows are decomposed through the rows
    #: (the same posterior, O(d m^2) instead of O(d^3)); dense: every factor dense (for comparisons)
    factor_form: FactorForm = FactorForm.auto  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        # null resolves here, so that every later reader (checkpoints, W&B, the fit) sees the concrete estimate
        if self.fisher_type is None:
            self.fisher_type = FisherType["mc-root" if self.backend == "marglik" else "mc"]


@dataclass
class HyperConfig:
    """``hyper``: the outer loop (Immer et al. 2021, Algorithm 1).

    The default protocol is the knee of the cost/quality frontier measured on the default job
    (``results/marglik_vs_grid.md``, issue #28): MAP steps on one augmented copy
    (``train_samples=1``), one hyperstep per epoch after burn-in on 2 x 128 examples with ``S = 8``
    copies and a Monte-Carlo GGN (``curvature.fisher_type=mc-root``, one backward pass instead of
    ``C - 1``; not the sampled-label ``mc``, whose biased derivative learned up to 5.4 degrees of
    rotation on upright digits), cosine-decayed hyper learning rates (``aug_lr=0.2``: with one step per update and the
    cosine decay a range moves by at most about ``aug_lr x updates / 2`` radians, 0.1 capped it near
    129 degrees), and the selection value on a fixed subset of 512 examples after every 5th update. Before it (``v0`` there): ``train_samples=S``, 2 hypersteps on
    4 x 128 with the type-2 GGN, constant hyper lrs and the whole-set selection value after every
    update, about 10x the cost at no better test NLL.
    """

    prior_structure: PriorStructure = PriorStructure.layerwise  #: one prior precision, or one per parameter tensor
    prior_prec_init: float = 1.0  #: initial prior precision (weight decay)
    lr: float = 0.1  #: Adam lr of the log prior precision
    aug_lr: float = 0.2  #: Adam lr of the augmentation ranges eta
    steps: int = 1  #: K hypersteps per marglik update
    #: P more hypersteps per update on the prior precision alone, reusing the last fit (no forward or backward pass)
    prior_steps: int = 0
    frequency: int = 1  #: F: a marglik update every F epochs (after burn-in)
    burn_in: int = 5  #: epochs of MAP training before the first marglik update
    schedule: Schedule = Schedule.cosine  #: of the hyper lrs over the epochs after burn-in
    augmentation: bool = True  #: learn affine augmentation ranges
    n_samples: int = 8  #: S augmented copies per image in the marglik fits (and training unless train_samples)
    #: S' augmented copies per image in the MAP steps (None: n_samples); 1 trains like ordinary augmentation,
    #: at the cost of one standard training, while the fits still average the logits over n_samples copies
    train_samples: Optional[int] = 1
    n_samples_test: Optional[int] = None  #: S at test time (None: n_samples)
    #: the affine transformations whose ranges are learned
    generators: List[AugGenerator] = field(  # type: ignore[valid-type]
        default_factory=lambda: [AugGenerator[g] for g in ALL_GENERATORS])
    marglik_batches: Optional[int] = 2  #: batches per Laplace fit (None: the whole training set)
    marglik_batch_size: Optional[int] = 128  #: batch size of the Laplace fit (None: trainer.batch_size)
    #: learned augmentation: take eta's gradient one fit batch at a time (two passes over the batches,
    #: the memory of one batch's graph instead of all of them; the same gradient; marglik backend)
    batchwise: bool = False
    #: the fixed estimator that picks the best epoch and gives the reported log marglik: full (the
    #: whole training set) | subset (selection_size examples drawn once per run from the seed)
    selection: SelectionEstimator = SelectionEstimator.subset
    selection_size: int = 512  #: examples of selection=subset (at most N)
    #: the selection value after every k-th marglik update (and always after the last one); the best epoch
    #: is chosen among these updates
    selection_every: int = 5


@dataclass
class TrainerConfig:
    """``trainer``: the MAP training of the network weights."""

    epochs: int = 50  #: training epochs
    batch_size: int = 64  #: MAP batch size (global under torchrun)
    lr: float = 1e-2  #: MAP learning rate
    lr_min: float = 1e-6  #: final lr of the cosine schedule
    schedule: Schedule = Schedule.cosine  #: MAP lr, per optimizer step
    optimizer: OptimizerName = OptimizerName.adam  #: of the MAP steps
    momentum: float = 0.9  #: sgd only
    device: str = "auto"  #: auto | cpu | cuda | cuda:<i> | mps
    seed: int = 0  #: seeds the weights, batches, augmentation noise and marglik subsets
    num_threads: Optional[int] = None  #: torch.set_num_threads (None: torch's default)
    eval_every: int = 1  #: test metrics every this many epochs (0: only at the end)
    eval_batch_size: int = 256  #: batch size of the test evaluation
    final_model: FinalModel = FinalModel.best  #: best (best-marglik checkpoint) | last
    max_rollbacks: int = 10  #: give up after this many non-finite losses / marglik values
    rollback_lr_factor: float = 0.5  #: multiply the offending lr by this after a rollback
    resume: Optional[str] = "auto"  #: auto | never | <path of a run dir or a checkpoint file>
    progress: bool = True  #: tqdm progress bar
    #: time one epoch of a standard training (the same network, fixed hyperparameters, one augmented copy) at
    #: the start, so summary.json['cost'] states the run's cost in standard trainings
    cost_reference: bool = True


@dataclass
class LoggerConfig:
    """``logger``: Weights & Biases. ``WANDB_MODE`` in the environment wins over ``mode``."""

    mode: LoggerMode = LoggerMode.offline  #: Weights & Biases mode (WANDB_MODE wins)
    project: str = "marglik"  #: W&B project
    group: Optional[str] = None  #: None: data/model/augmentation/prior, so expand vs reduce share a group
    name: Optional[str] = None  #: None: "<approx>-<copies_approx>-s<seed>"
    entity: Optional[str] = None  #: W&B entity (team or user)
    tags: List[str] = field(default_factory=list)  #: W&B tags


_SECTIONS: Dict[str, Type[Any]] = {
    "data": DataConfig,
    "curvature": CurvatureConfig,
    "hyper": HyperConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


# --------------------------------------------------------------------------- the run config
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
        (Hydra adds its own); a bad key, type or value raises :class:`ConfigError`.

        ``model`` accepts either ``{"name": ..., "kwargs": {...}}`` or a flat dict whose keys other
        than ``name`` are constructor kwargs. ``overrides`` are merged per section, e.g.
        ``Config.from_dict(trainer={"epochs": 3})``.

        Args:
            d: the nested dict (``None``: all defaults).
            **overrides: ``section={field: value}`` merged over ``d``'s sections.

        Returns:
            The typed, validated configuration.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or an invalid value.
        """
        cfg = cls(**sections_from_dict(d, overrides, _SECTIONS, ModelConfig))
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as plain data: ``config.json``, checkpoints, W&B.

        Returns:
            A nested dict of sections (enums as their strings).
        """
        return plain(self)

    def replace(self, **sections: Dict[str, Any]) -> "Config":
        """A copy with some fields of some sections replaced: ``cfg.replace(trainer={"epochs": 2})``.

        Args:
            **sections: ``section={field: value}``.

        Returns:
            A new validated configuration.

        Raises:
            ConfigError: as :meth:`from_dict`.
        """
        return Config.from_dict(self.to_dict(), **sections)

    def validate(self) -> None:
        """Check value ranges and curvature combinations (types are checked by :meth:`from_dict`);
        the checks are :func:`marglik.tuning.config_checks.validate_config`.

        Raises:
            ConfigError: naming the first invalid key, its value and what is allowed.
        """
        validate_config(self)

    def _float_keys(self) -> List[str]:
        """The dotted keys whose value is a float (sections and model options)."""
        return float_keys(self)

    # ------------------------------------------------------------------ schedule facts
    def marglik_updates(self) -> int:
        """Number of marginal-likelihood updates the schedule performs.

        Returns:
            The count of epochs ``e <= epochs`` with ``e > burn_in`` and
            ``(e - burn_in) % frequency == 0`` (:func:`marglik.tuning.schedules.marglik_update_due`).
        """
        h = self.hyper
        return max(0, (self.trainer.epochs - h.burn_in) // h.frequency)

    def warnings(self) -> List[str]:
        """Problems worth a warning line before a run starts (:func:`marglik.tuning.config_checks.run_warnings`).

        Returns:
            One message per problem (empty when none), e.g. that no tuning happens.
        """
        return run_warnings(self)

    # settings that may differ between an interrupted run and its resumption (trainer.epochs:
    # extending a finished run; the cosine schedules then stretch to the new length;
    # curvature.factor_form, hyper.batchwise: the same numbers to round-off, so is a checkpoint without the key)
    RESUME_FREE = ("trainer.resume", "trainer.device", "trainer.progress", "trainer.num_threads", "trainer.cost_reference",
                   "trainer.max_rollbacks", "trainer.rollback_lr_factor", "trainer.epochs", "logger",
                   "curvature.factor_form", "hyper.batchwise")

    # keys added to the schema later, with the behaviour a checkpoint written before them had: such a
    # checkpoint resumes under these values (and only under them)
    IMPLIED_BEFORE = {"hyper.train_samples": None, "hyper.selection_every": 1, "hyper.prior_steps": 0,
                      "curvature.approx_layers": {}}

    def resume_diff(self, other: Dict[str, Any]) -> List[str]:
        """What differs from a checkpoint's configuration, ignoring :attr:`RESUME_FREE`.

        Args:
            other: a saved :meth:`to_dict`.

        Returns:
            One ``"key: checkpoint <theirs> vs now <mine>"`` line per differing dotted key (empty:
            resumable); a key the checkpoint predates counts as its :attr:`IMPLIED_BEFORE` value.
        """
        return resume_diff(self, other, self.RESUME_FREE, self.IMPLIED_BEFORE)


# the names these helpers had when they lived here (kept importable)
_strict_types = strict_types
_typed = typed_section
_model_kwargs = model_kwargs
_resolved_types = resolved_types
_is_interpolation = is_interpolation
_valid_device = valid_device

# Hydra's ConfigStore: registered on import, as before the split (config_hydra imports this module)
from .config_hydra import HydraSchema, register_configs  # noqa: E402

register_configs()

__all__ = [
    "Config", "DataConfig", "ModelConfig", "CurvatureConfig", "HyperConfig", "TrainerConfig", "LoggerConfig",
    "ConfigError", "Choice", "MODEL_SCHEMAS", "CNNConfig", "MLPConfig", "WRN16_4Config", "ViTConfig",
    "register_configs", "describe_type",
    # re-exported from the modules that do the rest (choices, parsing, checks, Hydra)
    "Activation", "Approx", "ApproxRule", "AugGenerator", "DataName", "FactorForm", "FinalModel", "FisherType", "LoggerMode",
    "ModelName", "OptimizerName", "PriorStructure", "Schedule", "WRNNorm", "CurvatureBackend", "CurvatureStructure",
    "SelectionEstimator", "ALL_GENERATORS", "HydraSchema", "field_type", "flatten", "plain", "show_value",
    "type_problem", "unknown_key_error", "strict_types", "typed_section", "model_kwargs", "sections_from_dict",
    "resolved_types", "is_interpolation", "validate_config", "float_keys", "valid_device", "run_warnings",
    "resume_diff",
]
