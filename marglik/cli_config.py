"""The CLI's side of the typed config: check command-line overrides before Hydra runs, turn every
problem into one :class:`~marglik.tuning.config.ConfigError` line, and build ``marglik --help``
from the schema (so the help cannot drift from the defaults)."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, List, Optional, Sequence

from .tuning.config import (
    _SECTIONS,
    MODEL_SCHEMAS,
    Config,
    ConfigError,
    DataName,
    _strict_types,
    describe_type,
    field_type,
    show_value,
    type_problem,
    unknown_key_error,
)

CONFIG_MODULE = "marglik.conf"
GROUPS = ("data", "model", "experiment")


def yaml_variants(group: str) -> List[str]:
    """Names of the YAML variants shipped in ``marglik/conf/<group>`` (e.g. ``experiment``)."""
    from importlib.resources import files

    folder = files(CONFIG_MODULE) / group
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def experiments() -> List[str]:
    """Names of the ``+experiment=...`` YAML variants."""
    return yaml_variants("experiment")


def _override_value(override: Any) -> Any:
    try:
        return override.value()
    except Exception:
        return override.input_line


def _compose_error(err: BaseException, overrides: Sequence[Any]) -> ConfigError:
    """Map an exception of Hydra's compose (and its OmegaConf cause) to a one-line error."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    by_key = {o.key_or_group: o for o in overrides}
    if isinstance(err, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
        group, option = (m.group(1), m.group(2)) if m else ("config", "?")
        options = list(err.options or [])
        return ConfigError(group, option, f"unknown {group} option", "one of " + ", ".join(options))
    cause: Optional[BaseException] = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is not None:
        full_key = re.sub(r"\[\d+\]$", "", str(getattr(cause, "full_key", "") or ""))  # list element -> list
        klass = getattr(cause, "object_type", None)
        name = full_key.rsplit(".", 1)[-1]
        if not (klass is not None and hasattr(klass, "__dataclass_fields__")) and full_key.count(".") == 1:
            klass = _SECTIONS.get(full_key.split(".")[0])
        ov = by_key.get(full_key)
        value = _override_value(ov) if ov is not None else getattr(cause, "value", None)
        known = [f.name for f in fields(klass)] if klass is not None and hasattr(klass, "__dataclass_fields__") else []
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and known:
            return unknown_key_error(full_key, value, known, full_key.rsplit(".", 1)[0] or "the config")
        if name in known:
            tp = field_type(klass, name)
            return ConfigError(full_key, value, type_problem(tp), describe_type(tp))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError("override", " ".join(o.input_line for o in overrides) or "(none)", first,
                       "KEY=VALUE overrides, see marglik --help")


def _field_class(key: str, model_name: str) -> Optional[type]:
    section = key.split(".", 1)[0]
    if section == "model":
        return MODEL_SCHEMAS.get(model_name)
    return _SECTIONS.get(section)


def check_overrides(overrides: Sequence[str]) -> Config:
    """Compose the CLI config with ``overrides`` (Hydra syntax) exactly as ``marglik`` will, and
    validate it; returns the :class:`Config` or raises :class:`ConfigError` (one line).

    ``hydra.*`` overrides are Hydra's business and are skipped here.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from omegaconf import OmegaConf

    mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra.") and not o.lstrip("+~").startswith("hydra/")]
    try:
        parsed = OverridesParser.create().parse_overrides(mine)
    except OverrideParseException as err:
        bad = next((o for o in mine if _unparsable(o)), " ".join(mine))
        raise ConfigError("override", bad, "could not parse " + str(err).strip().splitlines()[0],
                          "KEY=VALUE with Hydra's override syntax (quote values with spaces)") from None
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="config", overrides=mine)
    except ConfigError:
        raise
    except Exception as err:  # Hydra / OmegaConf composition errors
        raise _compose_error(err, parsed) from None
    container = OmegaConf.to_container(cfg, resolve=True)
    model_name = str(container.get("model", {}).get("name", "")) if isinstance(container, dict) else ""
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or "." not in key or o.is_sweep_override():
            continue
        klass = _field_class(key, model_name)
        section, name = key.split(".", 1)
        if klass is None or "." in name:
            continue
        _strict_types(klass, {name: o.value()}, section + ".")  # booleans: true/false only
    return Config.from_dict(container)  # type: ignore[arg-type]


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
        return False
    except Exception:
        return True


# --------------------------------------------------------------------------- --help
#: (key, one-line meaning) of the options ``--help`` lists; defaults and allowed values come from the schema.
MAIN_OPTIONS = (
    ("data.rotation", "rotate each image by a fixed random angle in [-R, R] degrees (invariance benchmark)"),
    ("data.train_size", "random training subset"),
    ("curvature.approx", "K-FAC flavour of the Laplace marginal likelihood"),
    ("curvature.fisher_type", "exact GGN factors, sampled labels, or empirical Fisher"),
    ("curvature.separate_bias", "separate weight and bias Kronecker blocks (null: joint for marglik)"),
    ("hyper.augmentation", "learn affine augmentation ranges"),
    ("hyper.prior_structure", "one prior precision, or one per parameter tensor"),
    ("hyper.burn_in", "epochs of plain MAP training before the first marglik update"),
    ("hyper.frequency", "epochs between marglik updates"),
    ("hyper.steps", "hyperparameter steps per marglik update"),
    ("hyper.n_samples", "augmented copies per image"),
    ("hyper.selection", "fixed estimator of the best epoch and the reported log marglik"),
    ("hyper.selection_size", "examples of hyper.selection=subset (drawn once per run)"),
    ("trainer.epochs", "training epochs"),
    ("trainer.batch_size", "MAP batch size"),
    ("trainer.lr", "MAP learning rate"),
    ("trainer.device", "where to train: auto, cpu, cuda, cuda:<index>, mps"),
    ("trainer.seed", "training seed"),
    ("trainer.resume", "auto | never | <run dir or .ckpt>"),
    ("logger.mode", "Weights & Biases mode (WANDB_MODE wins)"),
)

EXAMPLES = (
    ("marglik trainer.epochs=10 logger.mode=disabled",
     "a short run of the default job (digits, small CNN, K-FAC-reduce, learned augmentation)"),
    ("marglik data.rotation=180 curvature.approx=expand model=mlp hyper.burn_in=2",
     "rotated digits, K-FAC-expand, an MLP"),
    ("marglik +experiment=cifar10_wrn16_4 data.download=true trainer.device=cuda",
     "the papers' CIFAR-10 WRN-16-4 setting (GPU)"),
)


def _default(key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(Config(), section), name)


def help_text() -> str:
    """The text of ``marglik --help``."""
    lines = [
        "marglik: Bayesian hyperparameter selection for neural networks.",
        "",
        "Trains a network on an image-classification task while tuning its prior precisions (weight decay)",
        "and learned data-augmentation ranges by gradient ascent on a K-FAC (expand or reduce) Laplace log",
        "marginal likelihood: no validation set, no grid search (Immer et al. 2021, Algorithm 1).",
        "Writes summary.json, history.csv, curves.png, config.json and checkpoints/ to the run directory",
        "outputs/<date>/<time>_<data>_<approx>/ (set it with hydra.run.dir=...); logs to W&B offline.",
        "",
        "Usage: marglik [GROUP=OPTION ...] [KEY=VALUE ...]      (also: python -m marglik ...)",
        "",
        "Groups:",
        f"  data={'|'.join(DataName.values())}  (default digits)",
        f"  model={'|'.join(list(MODEL_SCHEMAS) + yaml_variants('model'))}  (default cnn; each model has its own"
        " model.* options)",
        f"  +experiment={'|'.join(experiments())}",
        "",
        "Main options (default; allowed):",
    ]
    width = max(len(k) for k, _ in MAIN_OPTIONS) + 2
    for key, meaning in MAIN_OPTIONS:
        section, name = key.split(".")
        tp = field_type(_SECTIONS[section], name)
        lines.append(f"  {key:<{width}}{meaning}")
        lines.append(f"  {'':<{width}}  default {show_value(_default(key))}; {describe_type(tp)}")
    lines += ["", "Examples:"]
    for cmd, what in EXAMPLES:
        lines += [f"  {cmd}", f"      {what}"]
    lines += [
        "",
        "Every option and its value: marglik --cfg job [overrides]. A bad key, type or value is one line",
        "naming it and what is allowed (exit status 2; HYDRA_FULL_ERROR=1 shows the traceback).",
        "Hydra's own flags (--multirun, --cfg, --config-dir, ...): marglik --hydra-help",
    ]
    return "\n".join(lines)
