"""Configuration of a marginal-likelihood tuning run: one typed schema for the CLI and the Python API.

Where things live
-----------------
* **Defaults**: only in the dataclasses below (``DataConfig``, ``CurvatureConfig``, ``HyperConfig``,
  ``TrainerConfig``, ``LoggerConfig`` and one dataclass per model in :data:`MODEL_SCHEMAS`). They
  are registered in Hydra's ``ConfigStore`` by :func:`register_configs` (the schema node
  ``marglik_schema``, the ``data`` options ``digits|mnist|fashion_mnist|cifar10`` and the ``model``
  options ``cnn|mlp|wrn16_4|vit``), so the CLI composes typed nodes and YAML files under
  ``marglik/conf`` hold only *variants* (``experiment/*.yaml``) and Hydra's own settings
  (``config.yaml``).
* **Choices** are ``str`` enums (:class:`Choice` subclasses) whose member *names equal their
  values*: Hydra/OmegaConf parse ``curvature.approx=expand`` by member name, and
  ``cfg.curvature.approx == "expand"`` keeps working because the members are strings.
* **Checks**: field types (OmegaConf's merge onto the dataclass, plus :func:`_strict_types`:
  booleans are ``true``/``false`` only, numbers are not booleans), unknown keys, each model's own
  keyword arguments, and value ranges (:meth:`Config.validate`). Every failure raises
  :class:`ConfigError`, a ``ValueError`` whose message is one line::

      <key>=<value>: <problem>; allowed: <what is allowed>

  e.g. ``trainer.epochs=abc: wrong type; allowed: an integer``. The CLI prints it as
  ``marglik: config error: ...`` and exits with status 2 (``HYDRA_FULL_ERROR=1`` re-raises it
  with its traceback).

Adding a field
--------------
Add ``name: <type> = <default>  #: doc`` to the section dataclass (the ``#:`` comment is the
option's meaning in ``marglik --help``, which lists every field). For a choice, define
``class MyChoice(Choice): a = "a"; b = "b"`` (names = values; values that are not identifiers
use the functional form, see :data:`FisherType`) and type the field ``MyChoice`` (``Optional[MyChoice]``
if ``null`` is allowed). Range checks go in :meth:`Config.validate` as
``check(ok, "section.key", value, "allowed text")``. Nothing else (no YAML) needs to change. A
new model: a dataclass with ``name: ModelName = ModelName.<name>`` plus its constructor kwargs,
an entry in :data:`MODEL_SCHEMAS` and in :class:`ModelName`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Type

from ..augment import ALL_GENERATORS
from ..curvature.options import FisherType as EngineFisherType
from ..curvature.options import KFACApprox
from ..curvature.prior import PriorStructure as EnginePriorStructure
from ..curvature.row_factor import FactorForm as EngineFactorForm
from ..errors import UserError
from .backends import CurvatureBackend, CurvatureStructure, check_curvature_config
from .choices import Choice
from .estimator import SelectionEstimator


# --------------------------------------------------------------------------- choices
class DataName(Choice):
    digits = "digits"
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"


#: The engine's options (:mod:`marglik.curvature.options`, :mod:`marglik.curvature.prior`) as config
#: choices: the values come from the engine's enums, the member names equal the values (how
#: OmegaConf parses a string into an enum); ``type-2`` is not an identifier, hence the functional form.
Approx = Choice("Approx", [(m.value, m.value) for m in KFACApprox], module=__name__)


#: ``type-2`` is not an identifier, hence the functional form (member names = values).
FisherType = Choice("FisherType", [(m.value, m.value) for m in EngineFisherType], module=__name__)
FactorForm = Choice("FactorForm", [(m.value, m.value) for m in EngineFactorForm], module=__name__)
AugGenerator = Choice("AugGenerator", [(g, g) for g in ALL_GENERATORS], module=__name__)


#: the tuning loop learns a scalar or a layerwise prior precision (not the engine's diagonal one)
PriorStructure = Choice("PriorStructure", [(m.value, m.value) for m in EnginePriorStructure
                                           if m is not EnginePriorStructure.DIAGONAL], module=__name__)


class Schedule(Choice):
    constant = "constant"
    cosine = "cosine"


class OptimizerName(Choice):
    adam = "adam"
    sgd = "sgd"


class FinalModel(Choice):
    best = "best"
    last = "last"


class LoggerMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class ModelName(Choice):
    cnn = "cnn"
    mlp = "mlp"
    wrn16_4 = "wrn16_4"
    vit = "vit"


class Activation(Choice):
    tanh = "tanh"
    relu = "relu"


class WRNNorm(Choice):
    fixup = "fixup"
    batchnorm = "batchnorm"
    none = "none"


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


#: model name -> the dataclass of its constructor kwargs (plus ``name``).
MODEL_SCHEMAS: Dict[str, Type[Any]] = {
    "cnn": CNNConfig, "mlp": MLPConfig, "wrn16_4": WRN16_4Config, "vit": ViTConfig,
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
        self.name, self.kwargs = _model_kwargs(self.name, self.kwargs)


@dataclass
class CurvatureConfig:
    """``curvature``: the K-FAC Laplace approximation used for the marginal likelihood."""

    approx: Approx = Approx.reduce  #: K-FAC flavour on the positions inside an image (pixels, tokens)
    #: exact GGN factors (type-2), sampled labels (mc), or the empirical Fisher
    fisher_type: FisherType = FisherType["type-2"]  # type: ignore[valid-type]
    mc_samples: int = 1  #: labels sampled per output for fisher_type=mc
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


@dataclass
class HyperConfig:
    """``hyper``: the outer loop (Immer et al. 2021, Algorithm 1)."""

    prior_structure: PriorStructure = PriorStructure.layerwise  #: one prior precision, or one per parameter tensor
    prior_prec_init: float = 1.0  #: initial prior precision (weight decay)
    lr: float = 0.1  #: Adam lr of the log prior precision
    aug_lr: float = 0.1  #: Adam lr of the augmentation ranges eta
    steps: int = 2  #: K hypersteps per marglik update
    frequency: int = 1  #: F: a marglik update every F epochs (after burn-in)
    burn_in: int = 5  #: epochs of MAP training before the first marglik update
    schedule: Schedule = Schedule.constant  #: of the hyper lrs over the epochs after burn-in
    augmentation: bool = True  #: learn affine augmentation ranges
    n_samples: int = 8  #: S augmented copies per image (training and marglik)
    n_samples_test: Optional[int] = None  #: S at test time (None: n_samples)
    #: the affine transformations whose ranges are learned
    generators: List[AugGenerator] = field(  # type: ignore[valid-type]
        default_factory=lambda: [AugGenerator[g] for g in ALL_GENERATORS])
    marglik_batches: Optional[int] = 4  #: batches per Laplace fit (None: the whole training set)
    marglik_batch_size: Optional[int] = 128  #: batch size of the Laplace fit (None: trainer.batch_size)
    #: the fixed estimator that picks the best epoch and gives the reported log marglik: full (the
    #: whole training set) | subset (selection_size examples drawn once per run from the seed)
    selection: SelectionEstimator = SelectionEstimator.full
    selection_size: int = 512  #: examples of selection=subset (at most N)


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


@dataclass
class HydraSchema:
    """The root node the CLI composes (``marglik_schema`` in the ConfigStore); ``model`` is filled
    by the ``model`` group with one of :data:`MODEL_SCHEMAS`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
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


# --------------------------------------------------------------------------- errors and types
class ConfigError(UserError, ValueError):
    """A bad configuration value, type or key; ``str(err)`` is one line
    ``<key>=<value>: <problem>; allowed: <allowed>``."""

    kind = "config error"

    def __init__(self, key: str, value: Any, problem: str, allowed: str) -> None:
        self.key, self.value, self.problem, self.allowed = key, value, problem, allowed
        super().__init__(f"{key}={show_value(value)}: {problem}; allowed: {allowed}")


def show_value(value: Any) -> str:
    """A value as it would be written on the command line.

    Args:
        value: a config value.

    Returns:
        Its command-line spelling (``null``, ``true``, ``[a, b]``, an enum's value).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def describe_type(tp: Any) -> str:
    """What a field accepts, in words (for error messages and ``--help``).

    Args:
        tp: the field's type annotation.

    Returns:
        e.g. ``"an integer or null"``, ``"one of expand, reduce"``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return describe_type(inner[0]) + " or null"
    if origin in (list, List):
        item = args[0]
        if isinstance(item, type) and issubclass(item, enum.Enum):
            return "a list of values from " + ", ".join(m.value for m in item)
        return "a list of " + {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.value for m in tp)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def type_problem(tp: Any) -> str:
    """The problem of a value that does not fit a field.

    Args:
        tp: the field's type annotation.

    Returns:
        ``"not a boolean"``, ``"not a valid choice"`` or ``"wrong type"``.
    """
    text = describe_type(tp)
    if text.startswith("true or false"):
        return "not a boolean"
    return "not a valid choice" if text.startswith("one of") else "wrong type"


def _resolved_types(klass: Type[Any]) -> Dict[str, Any]:
    return typing.get_type_hints(klass)


def field_type(klass: Type[Any], key: str) -> Any:
    """The resolved type of a field of a config section.

    Args:
        klass: the section's dataclass.
        key: the field name.

    Returns:
        Its type annotation (forward references resolved).
    """
    return _resolved_types(klass)[key]


def _strict_types(klass: Type[Any], raw: Dict[str, Any], prefix: str) -> None:
    """Checks OmegaConf would let through: booleans are ``true``/``false`` only (not ``off``,
    ``yes``, ``1``), integers and numbers are not booleans."""
    hints = _resolved_types(klass)
    for key, value in raw.items():
        tp = hints.get(key)
        if tp is None or value is None or _is_interpolation(value):
            continue
        if typing.get_origin(tp) is typing.Union:
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if tp is bool and not isinstance(value, bool):
            raise ConfigError(prefix + key, value, "not a boolean", "true or false")
        if tp in (int, float) and isinstance(value, bool):
            raise ConfigError(prefix + key, value, "wrong type", describe_type(tp))


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def unknown_key_error(key: str, value: Any, known: List[str], where: str) -> ConfigError:
    """The error for an unknown key, suggesting the closest known one.

    Args:
        key: the dotted key given.
        value: its value.
        known: the keys allowed there.
        where: what holds them, for the message (e.g. ``"HyperConfig"``).

    Returns:
        The :class:`ConfigError` to raise.
    """
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0]}.{close[0]}?)" if close and "." in key else ""
    return ConfigError(key, value, f"unknown key{hint}", f"the keys of {where}: " + ", ".join(sorted(known)))


def _typed(klass: Type[Any], raw: Dict[str, Any], prefix: str, where: str) -> Any:
    """``raw`` merged onto the dataclass ``klass``: a ``klass`` instance, or :class:`ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = [f.name for f in fields(klass)]
    for key, value in raw.items():
        if key not in known:
            raise unknown_key_error(prefix + key, value, known, where)
    _strict_types(klass, raw, prefix)
    try:
        node = OmegaConf.merge(OmegaConf.structured(klass), raw)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", None) or getattr(err, "key", "") or "").split(".")[0].split("[")[0]
        if key in known:
            value = raw.get(key, getattr(err, "value", None))
            tp = field_type(klass, key)
            raise ConfigError(prefix + key, value, type_problem(tp), describe_type(tp)) from None
        problem = str(err).splitlines()[0]
        raise ConfigError(prefix.rstrip(".") or "config", raw, problem, f"the fields of {where}") from None


def plain(value: Any) -> Any:
    """Plain data for JSON and checkpoints.

    Args:
        value: enums, dataclasses, dicts, lists and tuples, nested.

    Returns:
        The same with enums as their string values, dataclasses as dicts and tuples as lists.
    """
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _model_kwargs(name: Any, kwargs: Dict[str, Any]) -> "tuple[ModelName, Dict[str, Any]]":
    if str(name) not in MODEL_SCHEMAS:
        raise ConfigError("model.name", name, "unknown model", "one of " + ", ".join(MODEL_SCHEMAS))
    schema = MODEL_SCHEMAS[str(name)]
    known = [f.name for f in fields(schema) if f.name != "name"]
    for key, value in kwargs.items():
        if key not in known:
            raise ConfigError(
                f"model.{key}", value, f"not an option of model {name} (select a model with model={name}, "
                f"which brings its own options, not with model.name={name})",
                f"the options of model {name}: " + ", ".join(known))
    typed = _typed(schema, {**kwargs, "name": str(name)}, "model.", f"model {name}")
    out = plain(typed)
    out.pop("name")
    return ModelName(str(name)), out


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
        d = dict(d or {})
        for key, val in overrides.items():
            if key not in _SECTIONS and key != "model":
                raise unknown_key_error(key, val, ["model", *_SECTIONS], "the config")
            d[key] = {**dict(d.get(key) or {}), **val}
        sections: Dict[str, Any] = {}
        for key, klass in _SECTIONS.items():
            raw = d.get(key) or {}
            if not isinstance(raw, dict):
                raise ConfigError(key, raw, "not a section", "a mapping of " + ", ".join(f.name for f in fields(klass)))
            sections[key] = _typed(klass, dict(raw), key + ".", key)
        raw = dict(d.get("model") or {})
        if "kwargs" in raw:
            extra = sorted(set(raw) - {"name", "kwargs"})
            if extra:
                raise ConfigError(f"model.{extra[0]}", raw[extra[0]], "unknown key", "name and kwargs (or flat kwargs)")
            sections["model"] = ModelConfig(raw.get("name", "cnn"), dict(raw["kwargs"] or {}))
        else:
            name = raw.pop("name", "cnn")
            sections["model"] = ModelConfig(name, raw)
        cfg = cls(**sections)
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
        """Check value ranges and curvature combinations (types are checked by :meth:`from_dict`).

        Raises:
            ConfigError: naming the first invalid key, its value and what is allowed.
        """

        def check(ok: bool, key: str, allowed: str) -> None:
            section, name = key.split(".")
            value = self.model.kwargs[name] if section == "model" else getattr(getattr(self, section), name)
            if isinstance(value, float) and not math.isfinite(value):  # inf passes "> 0": checked first
                raise ConfigError(key, value, "not a finite number", allowed.replace("a number", "a finite number"))
            if not ok:
                raise ConfigError(key, value, "invalid value", allowed)

        d, c, h, t = self.data, self.curvature, self.hyper, self.trainer
        check(d.train_size is None or d.train_size >= 1, "data.train_size", "an integer >= 1 or null")
        check(d.rotation >= 0, "data.rotation", "a number >= 0 (degrees)")
        check(d.translation >= 0, "data.translation", "a number >= 0 (pixels)")
        check(d.upsample is None or d.upsample >= 1, "data.upsample", "an integer >= 1 or null")
        check(c.mc_samples >= 1, "curvature.mc_samples", "an integer >= 1")
        check(h.prior_prec_init > 0, "hyper.prior_prec_init", "a number > 0")
        check(h.lr > 0, "hyper.lr", "a number > 0")
        check(h.aug_lr >= 0, "hyper.aug_lr", "a number >= 0")
        check(h.steps >= 1, "hyper.steps", "an integer >= 1")
        check(h.frequency >= 1, "hyper.frequency", "an integer >= 1")
        check(h.burn_in >= 0, "hyper.burn_in", "an integer >= 0")
        check(h.n_samples >= 1, "hyper.n_samples", "an integer >= 1")
        check(h.n_samples_test is None or h.n_samples_test >= 1, "hyper.n_samples_test", "an integer >= 1 or null")
        check(len(h.generators) >= 1, "hyper.generators", "a non-empty list of " + ", ".join(ALL_GENERATORS))
        check(h.marglik_batches is None or h.marglik_batches >= 1, "hyper.marglik_batches", "an integer >= 1 or null")
        check(h.marglik_batch_size is None or h.marglik_batch_size >= 1, "hyper.marglik_batch_size",
              "an integer >= 1 or null")
        check(h.selection_size >= 1, "hyper.selection_size", "an integer >= 1")
        check(t.epochs >= 0, "trainer.epochs", "an integer >= 0")
        check(t.batch_size >= 1, "trainer.batch_size", "an integer >= 1")
        check(t.lr > 0, "trainer.lr", "a number > 0")
        check(t.lr_min >= 0, "trainer.lr_min", "a number >= 0")
        check(0 <= t.momentum < 1, "trainer.momentum", "a number in [0, 1)")
        check(_valid_device(t.device), "trainer.device", "auto, cpu, cuda, cuda:<index> or mps")
        check(t.num_threads is None or t.num_threads >= 1, "trainer.num_threads", "an integer >= 1 or null")
        check(t.eval_every >= 0, "trainer.eval_every", "an integer >= 0 (0: only at the end)")
        check(t.eval_batch_size >= 1, "trainer.eval_batch_size", "an integer >= 1")
        check(t.max_rollbacks >= 0, "trainer.max_rollbacks", "an integer >= 0")
        check(0 < t.rollback_lr_factor <= 1, "trainer.rollback_lr_factor", "a number in (0, 1]")
        for name in ("dropout", "attention_dropout"):
            if name in self.model.kwargs:
                check(0 <= self.model.kwargs[name] < 1, f"model.{name}", "a number in [0, 1)")
        for key in self._float_keys():  # every other number: finite
            check(True, key, "a finite number")
        try:  # combinations a curvature backend cannot compute (tuning.backends says which and why)
            check_curvature_config(c, h.augmentation)
        except ValueError as err:
            key = "curvature.separate_bias" if "separate_bias" in str(err) else "curvature.backend"
            value = c.separate_bias if key == "curvature.separate_bias" else c.backend
            raise ConfigError(key, value, str(err), "the fix the message names") from None

    def _float_keys(self) -> List[str]:
        """The dotted keys whose value is a float (sections and model options)."""
        keys = [f"{section}.{f.name}" for section in _SECTIONS for f in fields(getattr(self, section))
                if isinstance(getattr(getattr(self, section), f.name), float)]
        return keys + [f"model.{k}" for k, v in self.model.kwargs.items() if isinstance(v, float)]

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
        """Problems worth a warning line before a run starts.

        Returns:
            One message per problem (empty when none), e.g. that no tuning happens.
        """
        out = []
        if self.marglik_updates() == 0:
            h, t = self.hyper, self.trainer
            first = h.burn_in + h.frequency
            out.append(
                f"no hyperparameter tuning will happen: trainer.epochs={t.epochs} but the first marginal-likelihood "
                f"update is after epoch {first} (hyper.burn_in={h.burn_in} + hyper.frequency={h.frequency}); the "
                f"run only trains the weights. Raise trainer.epochs to >= {first} or lower hyper.burn_in"
            )
        return out

    # settings that may differ between an interrupted run and its resumption (trainer.epochs:
    # extending a finished run; the cosine schedules then stretch to the new length;
    # curvature.factor_form: the same numbers to round-off, so is a checkpoint without the key)
    RESUME_FREE = ("trainer.resume", "trainer.device", "trainer.progress", "trainer.num_threads",
                   "trainer.max_rollbacks", "trainer.rollback_lr_factor", "trainer.epochs", "logger",
                   "curvature.factor_form")

    def resume_diff(self, other: Dict[str, Any]) -> List[str]:
        """What differs from a checkpoint's configuration, ignoring :attr:`RESUME_FREE`.

        Args:
            other: a saved :meth:`to_dict`.

        Returns:
            One ``"key: checkpoint <theirs> vs now <mine>"`` line per differing dotted key (empty:
            resumable).
        """
        out = []
        mine = flatten(self.to_dict())
        theirs = flatten(plain(other))
        for key in sorted(set(mine) | set(theirs)):
            if any(key == f or key.startswith(f + ".") for f in self.RESUME_FREE):
                continue
            if mine.get(key, "<missing>") != theirs.get(key, "<missing>"):
                out.append(f"{key}: checkpoint {theirs.get(key, '<missing>')!r} vs now {mine.get(key, '<missing>')!r}")
        return out


def _valid_device(spec: str) -> bool:
    import re

    return re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec) is not None


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as dotted keys.

    Args:
        d: nested dicts (e.g. :meth:`Config.to_dict`).
        prefix: prepended to every key.

    Returns:
        ``{"section.key": value}``; an empty dict stays a value.
    """
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


register_configs()

__all__ = [
    "Config", "DataConfig", "ModelConfig", "CurvatureConfig", "HyperConfig", "TrainerConfig", "LoggerConfig",
    "ConfigError", "Choice", "MODEL_SCHEMAS", "CNNConfig", "MLPConfig", "WRN16_4Config", "ViTConfig",
    "register_configs", "describe_type",
]
