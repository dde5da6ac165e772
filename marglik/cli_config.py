"""The CLI's side of the typed config: check command-line overrides before Hydra runs, turn every
problem into one :class:`~marglik.tuning.config.ConfigError` line, and build ``marglik --help``
from the schema (so the help cannot drift from the defaults)."""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import fields
from typing import Any, Dict, List, Optional, Sequence

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
        allowed = "one of " + ", ".join(options)
        if group == "model" and "tv" in options and "/" not in option:
            allowed += f", or tv:<a torchvision classifier> (e.g. model=tv:{option} if torchvision has {option})"
        return ConfigError(group, option, f"unknown {group} option", allowed)
    cause: Optional[BaseException] = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is not None:
        full_key = re.sub(r"\[\d+\]$", "", str(getattr(cause, "full_key", "") or ""))  # list element -> list
        klass = getattr(cause, "object_type", None)
        parts = full_key.split(".")
        if len(parts) > 2 and parts[1] in {f.name for f in fields(_SECTIONS.get(parts[0], object))
                                           if hasattr(_SECTIONS.get(parts[0]), "__dataclass_fields__")}:
            full_key, klass = ".".join(parts[:2]), _SECTIONS[parts[0]]  # an entry of a mapping field
            if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
                return ConfigError(full_key, _override_value(by_key[full_key]) if full_key in by_key else None,
                                   "Hydra adds keys to a mapping only with a leading +",
                                   f"+{full_key}={{name:value,...}}")
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


def expand_model_shorthand(overrides: Sequence[str]) -> List[str]:
    """``model=tv:<arch>`` -> ``model=tv model.arch=<arch>`` (any torchvision classifier by name).

    Args:
        overrides: the command line's overrides.

    Returns:
        The overrides with every ``model=tv:<arch>`` replaced by the two overrides Hydra composes.
    """
    out: List[str] = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+") == "model" and value.startswith("tv:"):
            out += [f"{key}=tv", f"model.arch={value[3:]}"]
        else:
            out.append(o)
    return out


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
#: the options of the top of ``--help`` (the ones a first run changes); every other one is listed below them
MAIN_OPTIONS = (
    "data.rotation", "data.train_size", "curvature.approx", "curvature.copies_approx", "curvature.backend",
    "hyper.augmentation", "hyper.prior_structure", "hyper.burn_in", "trainer.epochs", "trainer.lr",
    "trainer.device", "trainer.num_threads", "trainer.resume", "logger.mode",
)

EXAMPLES = (
    ("marglik trainer.epochs=10 logger.mode=disabled",
     "a short run of the default job (digits, small CNN, K-FAC-reduce, learned augmentation)"),
    ("marglik data.rotation=90 curvature.approx=expand model=mlp hyper.burn_in=2",
     "rotated digits, K-FAC-expand, an MLP: the learned rotation range grows towards the data's 90 degrees"),
    ("marglik -m model=mlp,cnn trainer.epochs=20 hydra.sweep.dir=runs/arch && marglik-report runs/arch",
     "model selection: one run per architecture, then rank them by their log marginal likelihood"),
    ("marglik +experiment=cifar10_wrn16_4 data.download=true trainer.device=cuda",
     "the papers' CIFAR-10 WRN-16-4 setting (GPU)"),
)

_PLACEHOLDERS = {"hydra.job.num": "job number", "hydra.job.override_dirname": "overrides"}


def field_docs(klass: type) -> Dict[str, str]:
    """The ``#:`` comments of a config dataclass's fields: the text after ``#:`` on the field's
    line, or on the ``#:`` lines just above it (read from the source, the one place they are written).

    Args:
        klass: a section dataclass (or a model's schema).

    Returns:
        ``{field name: its comment}`` for the fields that have one (empty if the source is unavailable).
    """
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(klass)}
    docs: Dict[str, str] = {}
    pending: List[str] = []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        m = re.match(r"\s+(\w+)\s*:", line)
        if m and m.group(1) in names:
            trailing = re.search(r"#:\s*(.*)$", line)
            doc = " ".join(pending + ([trailing.group(1).strip()] if trailing else []))
            if doc:
                docs[m.group(1)] = doc
        pending = []
    return docs


def render_dir_pattern(pattern: str) -> str:
    """A Hydra run / sweep directory pattern in words: ``${now:%Y-%m-%d}`` -> ``<date>``,
    ``${data.name}`` -> ``<data.name>``, ``${bias_suffix:...}`` -> ``[-sepbias]``.

    Args:
        pattern: the pattern as written in ``marglik/conf/config.yaml``.

    Returns:
        The readable form shown by ``--help``.
    """
    out = re.sub(r"\$\{bias_suffix:\$\{[^}]*\}\}", "[-sepbias]", pattern)
    out = out.replace("${now:%Y-%m-%d}", "<date>")
    out = re.sub(r"\$\{now:[^}]*\}", "<time>", out)
    return re.sub(r"\$\{([\w.]+)\}", lambda m: f"<{_PLACEHOLDERS.get(m.group(1), m.group(1))}>", out)


def output_dirs() -> "tuple[str, str]":
    """The run and sweep directory patterns of ``marglik/conf/config.yaml``, rendered.

    Returns:
        ``(run directory, sweep job directory)``.
    """
    from importlib.resources import files

    from omegaconf import OmegaConf

    raw = OmegaConf.create((files(CONFIG_MODULE) / "config.yaml").read_text())
    hydra_cfg = OmegaConf.to_container(raw, resolve=False)["hydra"]  # the patterns, not their values
    sweep = hydra_cfg["sweep"]
    return render_dir_pattern(hydra_cfg["run"]["dir"]), render_dir_pattern(f"{sweep['dir']}/{sweep['subdir']}")


def _option_line(key: str, klass: type, default: Any, docs: Dict[str, str], width: int) -> List[str]:
    """``  key=default   meaning (allowed)``, wrapped; the meaning starts a new line after a long default."""
    name = key.rsplit(".", 1)[-1]
    meaning = re.sub(r"\bNone\b", "null", docs.get(name, ""))  # as written on the command line
    allowed = describe_type(field_type(klass, name))
    text = f"{meaning} ({allowed})" if meaning else allowed
    head = f"  {key}={show_value(default)}"
    indent = " " * (width + 2)
    if len(head) >= width + 2:
        return [head] + textwrap.wrap(text, 118, initial_indent=indent, subsequent_indent=indent)
    return textwrap.wrap(text, 118, initial_indent=f"{head:<{width + 2}}", subsequent_indent=indent)


def _section_lines(section: str, klass: type, skip: Sequence[str], width: int) -> List[str]:
    """Every field of a section (or model schema) not in ``skip``; a model's ``name`` is its group."""
    docs = field_docs(klass)
    default = klass()
    lines: List[str] = []
    for f in fields(klass):
        key = f"{section}.{f.name}"
        if key in skip or (section == "model" and f.name == "name"):
            continue
        lines += _option_line(key, klass, getattr(default, f.name), docs, width)
    return lines


def help_text() -> str:
    """The text of ``marglik --help``, generated from the schema: every option of every section and
    model with its default, its ``#:`` comment and what it allows, and the output directories of
    ``marglik/conf/config.yaml``.

    Returns:
        The help text.
    """
    run_dir, sweep_dir = output_dirs()
    width = 36
    lines = [
        "marglik: Bayesian hyperparameter selection for neural networks.",
        "",
        "Trains a network on an image-classification task while tuning its prior precisions (weight decay)",
        "and learned data-augmentation ranges by gradient ascent on a K-FAC (expand or reduce) Laplace log",
        "marginal likelihood: no validation set, no grid search (Immer et al. 2021, Algorithm 1).",
        f"Writes summary.json, history.csv, curves.png, config.json and checkpoints/ to {run_dir}/",
        "(set it with hydra.run.dir=...) and says at the end, in plain words, what it learned; logs to W&B offline.",
        f"A sweep (marglik -m a=x,y ...) writes one run per job to {sweep_dir}/;",
        "marglik-report DIR ranks the runs under DIR by their log marginal likelihood (model selection).",
        "",
        "Usage: marglik [GROUP=OPTION ...] [KEY=VALUE ...]      (also: python -m marglik ...)",
        "",
        "Groups:",
        f"  data={'|'.join(DataName.values())}  (default digits)",
        f"  model={'|'.join(list(MODEL_SCHEMAS) + yaml_variants('model'))}  (default cnn; each model has its own"
        " model.* options)",
        "  model=tv:<name>  any torchvision classifier by name, random init (= model=tv model.arch=<name>)",
        f"  +experiment={'|'.join(experiments())}",
        "",
        "Main options (KEY=default  meaning (allowed)):",
    ]
    for key in MAIN_OPTIONS:
        section, name = key.split(".")
        klass = _SECTIONS[section]
        lines += _option_line(key, klass, getattr(klass(), name), field_docs(klass), width)
    for section, klass in _SECTIONS.items():
        lines += ["", f"{section}:"] + _section_lines(section, klass, MAIN_OPTIONS, width)
    for model, schema in MODEL_SCHEMAS.items():
        lines += ["", f"model={model} options:"] + _section_lines("model", schema, (), width)
    lines += ["", "Examples:"]
    for cmd, what in EXAMPLES:
        lines += [f"  {cmd}", f"      {what}"]
    lines += [
        "",
        "Exit status: 0 the run finished (problems it ran into are printed as 'marglik: warning: ...' lines and",
        "listed in summary.json's warnings); 2 a cause you can fix (a bad key, type or value, a device this",
        "machine lacks, missing data, a damaged or mismatched checkpoint, a backend that cannot run the model, a",
        "torchvision that does not match torch, an unwritable folder): one line naming it and the fix;",
        "130 interrupted (Ctrl-C; the line says how to resume). HYDRA_FULL_ERROR=1 shows the tracebacks.",
        "Every option and its value: marglik --cfg job [overrides].",
        "Hydra's own flags (--multirun, --cfg, --config-dir, ...): marglik --hydra-help",
    ]
    return "\n".join(lines)
