"""The typed config: one schema (dataclasses in the ConfigStore) for the CLI and the Python API,
one-line errors naming key, value and what is allowed. The CLI's exit status / output are checked
through the real entry point in test_cli.py."""

from __future__ import annotations

import inspect
import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from marglik.cli_config import EXAMPLES, check_overrides, help_text
from marglik.models import MODEL_NAMES, get_model
from marglik.tuning.config import MODEL_SCHEMAS, Config, ConfigError


def _compose(overrides=()):
    with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)


def test_cli_defaults_are_the_dataclass_defaults():
    """No YAML holds a default: the composed CLI config equals ``Config()``."""
    assert Config.from_dict(_compose()).to_dict() == Config().to_dict()


def test_enums_compare_as_strings_and_serialise_plainly():
    cfg = Config.from_dict(curvature={"approx": "expand", "fisher_type": "type-2"})
    assert cfg.curvature.approx == "expand" and f"{cfg.curvature.approx}" == "expand"
    assert cfg.curvature.fisher_type == "type-2" and Config().curvature.fisher_type == "mc-root"
    d = cfg.to_dict()
    assert d["curvature"] == {"approx": "expand", "approx_layers": {}, "fisher_type": "type-2", "mc_samples": 1,
                              "copies_approx": "reduce",
                              "backend": "marglik", "structure": "kron", "separate_bias": None,
                              "factor_form": "auto"}
    assert d["hyper"]["selection"] == "subset" and type(d["hyper"]["selection"]) is str
    assert type(d["curvature"]["approx"]) is str and type(d["hyper"]["generators"][0]) is str
    json.dumps(d)  # plain JSON


@pytest.mark.parametrize("sections, message", [
    ({"hyper": {"augmentation": "off"}}, "hyper.augmentation=off: not a boolean; allowed: true or false"),
    ({"hyper": {"augmentation": 1}}, "hyper.augmentation=1: not a boolean; allowed: true or false"),
    ({"trainer": {"epochs": "abc"}}, "trainer.epochs=abc: wrong type; allowed: an integer"),
    ({"trainer": {"epochs": True}}, "trainer.epochs=true: wrong type; allowed: an integer"),
    ({"data": {"rotation": "abc"}}, "data.rotation=abc: wrong type; allowed: a number"),
    ({"curvature": {"approx": "full"}}, "curvature.approx=full: not a valid choice; allowed: one of expand, reduce"),
    ({"hyper": {"generators": ["rotation", "foo"]}},
     "hyper.generators=[rotation, foo]: wrong type; allowed: a list of values from translation_x"),
    ({"trainer": {"epoch": 3}}, "trainer.epoch=3: unknown key (did you mean trainer.epochs?)"),
    ({"hyper": {"steps": 0}}, "hyper.steps=0: invalid value; allowed: an integer >= 1"),
    ({"hyper": {"selection": "best"}}, "hyper.selection=best: not a valid choice; allowed: one of full, subset"),
    ({"hyper": {"selection_size": 0}}, "hyper.selection_size=0: invalid value; allowed: an integer >= 1"),
    ({"curvature": {"separate_bias": "yes"}}, "curvature.separate_bias=yes: not a boolean"),
    ({"trainer": {"device": "gpu"}}, "trainer.device=gpu: invalid value"),
    ({"model": {"name": "mlp", "width": 16}}, "model.width=16: not an option of model mlp"),
    ({"model": {"name": "resnet"}}, "model.name=resnet: unknown model; allowed: one of cnn, mlp, wrn16_4, vit"),
    ({"model": {"name": "cnn", "width": "wide"}}, "model.width=wide: wrong type; allowed: an integer"),
])
def test_bad_values_are_one_line_errors(sections, message):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(**sections)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text and "; allowed: " in text
    assert isinstance(info.value, ValueError)


def test_booleans_true_false_only_on_the_command_line():
    assert check_overrides(["hyper.augmentation=false"]).hyper.augmentation is False
    for bad in ("off", "no", "rotation", "0"):
        with pytest.raises(ConfigError, match=f"hyper.augmentation={bad}: not a boolean"):
            check_overrides([f"hyper.augmentation={bad}"])


def test_ints_become_floats_for_float_fields():
    cfg = check_overrides(["data.rotation=90"])
    assert cfg.data.rotation == 90.0 and isinstance(cfg.data.rotation, float)


def test_each_model_has_a_config_with_only_its_own_options():
    assert set(MODEL_SCHEMAS) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        cfg = check_overrides([f"model={name}"])
        assert cfg.model.name == name
        # the schema's options are exactly keyword arguments of the model, and build it
        model = get_model(name, 1, 10, 8, **cfg.model.kwargs)
        sig = inspect.signature(type(model).__init__).parameters
        assert set(cfg.model.kwargs) <= set(sig), name
    assert check_overrides(["model=vit", "model.hidden_dim=16"]).model.kwargs["hidden_dim"] == 16
    # model.name=mlp keeps the cnn options: a one-line error, not a TypeError in MLP.__init__
    with pytest.raises(ConfigError, match="model.width=16: not an option of model mlp"):
        check_overrides(["model.name=mlp"])
    with pytest.raises(ConfigError, match="model.width=3: unknown key"):
        check_overrides(["model=mlp", "model.width=3"])
    with pytest.raises(ConfigError, match="model=resnet: unknown model option; allowed: one of cnn, cnn_wide, mlp, tv, vit, wrn16_4, or "
                       r"tv:<a torchvision classifier> \(e.g. model=tv:resnet"):
        check_overrides(["model=resnet"])


def test_every_yaml_variant_composes_and_validates():
    from marglik.cli_config import yaml_variants

    assert "cifar10_wrn16_4" in yaml_variants("experiment")
    for name in yaml_variants("experiment"):
        check_overrides([f"+experiment={name}"])
    for name in yaml_variants("model"):
        cfg = check_overrides([f"model={name}"])
        get_model(str(cfg.model.name), 1, 10, 8, **cfg.model.kwargs)
    wide = check_overrides(["model=cnn_wide", "model.hidden=32"])
    assert wide.model.name == "cnn" and wide.model.kwargs == {"width": 64, "hidden": 32}


def test_compose_errors_name_key_value_and_allowed():
    cases = {
        "trainer.epochs=abc": "trainer.epochs=abc: wrong type; allowed: an integer",
        "curvature.fisher_type=type2": "curvature.fisher_type=type2: not a valid choice; allowed: one of type-2, mc, mc-root, empirical",
        "hyper.generators=[rotation,foo]": "hyper.generators=[rotation, foo]: wrong type; allowed: a list of values from",
        "trainer.epoch=3": "trainer.epoch=3: unknown key (did you mean trainer.epochs?)",
        "+trainer.foo=1": "trainer.foo=1: unknown key",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            check_overrides([override])
        assert str(info.value).startswith(message), str(info.value)


def test_no_tuning_schedule_is_detected():
    assert Config.from_dict(trainer={"epochs": 1}).marglik_updates() == 0
    assert "no hyperparameter tuning will happen" in Config.from_dict(trainer={"epochs": 5}).warnings()[0]
    cfg = Config.from_dict(trainer={"epochs": 7}, hyper={"burn_in": 2, "frequency": 3})
    assert cfg.marglik_updates() == 1 and cfg.warnings() == []  # epoch 5 only
    assert Config.from_dict(trainer={"epochs": 6}).marglik_updates() == 1


def test_help_examples_are_valid_commands():
    text = help_text()
    assert text.count("\n  marglik ") == len(EXAMPLES) == 4
    for cmd, _ in EXAMPLES:  # a sweep (-m key=a,b) is checked once per value
        words = [w for w in cmd.split("&&")[0].split()[1:] if not w.startswith("-")]
        sweep = next((w for w in words if "," in w), None)
        for value in (sweep.split("=")[1].split(",") if sweep else [None]):
            check_overrides([f"{w.split('=')[0]}={value}" if w == sweep else w for w in words])
    for key in ("curvature.approx", "hyper.augmentation", "trainer.epochs", "expand, reduce", "model=cnn|mlp|wrn16_4|vit|tv|cnn_wide", "model=tv:<name>"):
        assert key in text


def test_help_lists_every_option_of_the_schema_with_its_default():
    """--help is generated from the dataclasses: no option is left out (the issue found copies_approx,
    backend, structure and num_threads missing from a hand-written list) and every default is the code's."""
    from dataclasses import fields

    from marglik.cli_config import field_docs
    from marglik.tuning.config import _SECTIONS, show_value

    text = help_text()
    for section, klass in _SECTIONS.items():
        default = klass()
        for f in fields(klass):
            assert f"  {section}.{f.name}={show_value(getattr(default, f.name))}" in text, f"{section}.{f.name}"
    for model, schema in MODEL_SCHEMAS.items():
        assert f"model={model} options:" in text
        for f in fields(schema):
            if f.name != "name":
                assert f"  model.{f.name}={show_value(getattr(schema(), f.name))}" in text, (model, f.name)
    assert field_docs(_SECTIONS["trainer"])["num_threads"].startswith("torch.set_num_threads")
    assert "curvature.copies_approx=reduce" in text and "trainer.num_threads=null" in text


def test_help_shows_the_run_directory_hydra_really_uses():
    """The pattern in --help, read as a regex, matches the directory Hydra resolves for a run."""
    import re

    from marglik.cli_config import output_dirs

    pattern, _ = output_dirs()
    assert pattern in help_text()
    regex = re.escape(pattern).replace(re.escape("[-sepbias]"), "(-sepbias)?")
    regex = re.sub(r"<[^>]*>", "[^/]+", regex.replace("\\<", "<").replace("\\>", ">"))
    for overrides in ([], ["curvature.separate_bias=true", "curvature.approx=expand"]):
        with initialize_config_module(config_module="marglik.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        resolved = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
        assert re.fullmatch(regex, resolved), (regex, resolved)
    assert re.fullmatch(regex, "outputs/2025-01-01/10-00-00_digits_expand-reduce-sepbias")
    assert not re.fullmatch(regex, "outputs/2025-01-01/10-00-00_digits_reduce")  # negative control: old pattern


def test_choice_member_names_equal_values():
    """OmegaConf parses a string into an enum by member *name*; the value is what users read."""
    from marglik.tuning import config as C

    choices = [v for v in vars(C).values() if isinstance(v, type) and issubclass(v, C.Choice) and v is not C.Choice]
    assert len(choices) >= 10
    for enum_type in choices:
        for name, member in enum_type.__members__.items():
            assert name == member.value, (enum_type, name)
