"""Typed config: loading, overrides, validation, and the shipped YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from taid.config import Config, ConfigError, describe, dump, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
teacher: {name_or_path: some/teacher}
student: {init: teacher_layers, layers: 2}
data: {path: data/quickstart.jsonl}
"""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.loss.name in ("taid", "fkl", "rkl", "tvd", "jsd", "skl", "srkl", "akl", "sft")


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "quickstart.yaml"} <= names
    assert len(names) >= 5  # plus the paper's three recipes


def test_the_demo_commands_name_valid_settings():
    """`make demo` writes a teacher cache, then trains from it, both with the overrides of the
    Makefile's DEMO_CACHE: they must make a valid config (a typo would show only at the end
    of the cache write)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("DEMO_CACHE"))
    overrides = line.split(":=", 1)[1].split()
    config = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    assert config.teacher.source == "cache" and config.cache.mode == "hidden"
    assert config.cache.dtype == "float32"  # exact logits: the same student as the online demo
    demo = text[text.index("\ndemo:") :].split("\n\n")[0]
    assert "taid-cache-teacher --config configs/quickstart.yaml $(DEMO_CACHE)" in demo
    assert "scripts/train.py --config configs/quickstart.yaml $(DEMO_CACHE)" in demo


def test_resolved_config_round_trips(tmp_path):
    config = load_config(ROOT / "configs" / "smoke.yaml", ["train.max_steps=3"])
    path = write(tmp_path, dump(config))
    assert load_config(path) == config


def test_overrides_are_typed_by_the_schema(tmp_path):
    config = load_config(
        write(tmp_path, BASE),
        [
            "train.max_steps=20",
            "loss.name=fkl",
            "train.lr=3e-4",
            "resume=false",
            "train.max_grad_norm=null",
        ],
    )
    assert config.train.max_steps == 20 and isinstance(config.train.max_steps, int)
    assert config.loss.name == "fkl"
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.resume is False
    assert config.train.max_grad_norm is None


def test_loss_parameters_sit_beside_the_name(tmp_path):
    config = load_config(write(tmp_path, BASE + "loss: {name: taid, t_start: 0.2, alpha: 0.01}"))
    assert config.loss.params == {"t_start": 0.2, "alpha": 0.01}
    config = load_config(write(tmp_path, BASE), ["loss.name=jsd", "loss.beta=0.5"])
    assert config.loss.params == {"beta": 0.5}


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        (BASE + "trian: {max_steps: 3}", [], r"unknown config key 'trian'; did you mean 'train'"),
        (
            BASE,
            ["train.max_step=3"],
            r"unknown config key 'train.max_step'; did you mean 'max_steps'",
        ),
        (BASE, ["train.max_steps=ten"], r"train.max_steps: expected an integer, got 'ten'"),
        (BASE, ["train.max_steps=0"], r"train.max_steps must be > 0, got 0"),
        (BASE, ["train.mixed_precision=fp8"], r"train.mixed_precision: 'fp8' is not one of"),
        (BASE, ["loss.name=kld"], r"loss.name 'kld' is not a registered loss"),
        (
            BASE,
            ["loss.t_strat=0.2"],
            r"unknown config key 'loss.t_strat' for loss 'taid'; "
            r"did you mean 't_start'",
        ),
        (
            BASE,
            ["loss.name=fkl", "loss.t_start=0.2"],
            r"unknown config key 'loss.t_start' for loss "
            r"'fkl'",
        ),
        (BASE, ["loss.t_start=1.5"], r"loss: need 0 <= t_start <= t_end <= 1"),
        (BASE, ["loss.total_steps=5"], r"set by the trainer"),
        (BASE, ["train.lr_scheduler=cosin"], r"did you mean 'cosine'"),
        (BASE, ["resume=true"], r"resume must be 'auto', a checkpoint path, or false"),
        (BASE, ["student.init=pretrained"], r"student.name_or_path is required"),
        (BASE, ["data.path="], r"data.path is required"),
        # regression: a teacher with both used to be built at random, ignoring the weights
        (
            BASE,
            ["teacher.architecture={model_type: llama}"],
            r"teacher.name_or_path and teacher.architecture are both set",
        ),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        load_config(None, ["train.max_steps"])


def test_describe_covers_every_field_with_help():
    rows = describe()
    keys = [r[0] for r in rows]
    for required in (
        "output_dir",
        "train.max_steps",
        "train.save_every",
        "resume",
        "loss.name",
        "seed",
        "data.packing",
        "student.layers",
    ):
        assert required in keys
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]


def test_config_reference_in_docs_is_generated_from_the_schema():
    from taid.config import reference_markdown

    text = (ROOT / "docs" / "config.md").read_text()
    assert reference_markdown() in text, (
        "docs/config.md is out of date: regenerate it with `python -m taid.config > docs/config.md`"
    )


def test_yaml_1_1_exponent_without_dot_is_a_number(tmp_path):
    config = load_config(write(tmp_path, BASE + "train: {lr: 1e-4}"))
    assert config.train.lr == 1e-4
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, BASE), ["train.lr=fast"])


def test_garbled_yaml_is_named_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 0\nteacher: {a: 1\n  b: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:\d+: not valid YAML"):
        load_config(path)


def test_loss_ignore_index_is_set_by_the_trainer():
    # The collator marks ignored labels with taid.data.IGNORE_INDEX; a different loss value
    # would count padding as targets in the loss but not in the step's token count.
    with pytest.raises(ConfigError, match=r"'loss.ignore_index'.*set by the trainer"):
        load_config(None, ["data.path=x.jsonl", "teacher.name_or_path=x", "loss.ignore_index=0"])


@pytest.mark.parametrize("name", ["fkl", "skl", "jsd", "ctkd", "sft"])
def test_switching_the_loss_on_the_command_line_leaves_the_files_loss_keys_behind(name, caplog):
    """README: `train.py --config configs/quickstart.yaml loss.name=fkl`. TAID's t_start must
    not block fkl, and TAID's alpha/beta must not become skew KL's alpha or JSD's beta."""
    import logging

    with caplog.at_level(logging.WARNING, logger="taid"):
        config = load_config(ROOT / "configs" / "quickstart.yaml", [f"loss.name={name}"])
    assert config.loss.name == name and config.loss.params == {}
    assert "loss.t_start" in caplog.text and "do not apply" in caplog.text
    # what the command line sets is checked against the new loss
    if name == "skl":
        assert load_config(
            ROOT / "configs" / "quickstart.yaml", ["loss.name=skl", "loss.alpha=0.2"]
        ).loss.params == {"alpha": 0.2}
    with pytest.raises(ConfigError, match="unknown config key 'loss.t_start'"):
        load_config(ROOT / "configs" / "quickstart.yaml", [f"loss.name={name}", "loss.t_start=0.3"])


def test_an_unquoted_no_is_the_string_where_the_choices_are_strings(tmp_path):
    # YAML 1.1 reads `no` as False; train.mixed_precision's choices are "no", "bf16", "fp16"
    assert (
        load_config(
            None,
            [
                "data.path=x.jsonl",
                "teacher.name_or_path=x",
                "student.name_or_path=x",
                "train.mixed_precision=no",
            ],
        ).train.mixed_precision
        == "no"
    )
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {path: x.jsonl}\nteacher: {name_or_path: x}\n"
        "student: {name_or_path: x}\ntrain: {mixed_precision: no}\n"
    )
    assert load_config(path).train.mixed_precision == "no"
