"""ltdist.config: dataclass configs from YAML and key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from ltdist.config import ConfigError, dump_yaml, from_dict, load_config, to_dict

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs


@dataclass
class LoaderCfg:
    batch_size: int = 32
    num_workers: int = 2
    shuffle: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("loader.batch_size must be >= 1")


@dataclass
class TrainCfg:
    name: str = "run"
    lr: float = 1e-3
    epochs: int = 10
    amp: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    classes: list[str] = field(default_factory=list)
    milestones: list[int] = field(default_factory=list)
    sizes: tuple[int, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)
    seed: Optional[int] = None  # noqa: UP045 (the typing.Optional spelling is tested on purpose)
    tag: str | None = None
    loader: LoaderCfg = field(default_factory=LoaderCfg)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")


@dataclass
class Required:
    out: str
    steps: int = 1


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# -- YAML files ---------------------------------------------------------------------------------


def test_defaults_without_file() -> None:
    assert load_config(TrainCfg) == TrainCfg()


def test_nested_yaml_with_coercion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: exp1
lr: 1e-4            # YAML 1.1 reads this as a string
epochs: "12"
amp: "yes"
precision: bf16
classes: [cat, dog]
milestones: ["3", 6.0]
sizes: [1, 2]
weights: {cat: 1e-2, dog: 2}
seed: 7
loader:
  batch_size: 8
  shuffle: false
""",
    )
    cfg = load_config(TrainCfg, path)
    assert cfg == TrainCfg(
        name="exp1",
        lr=1e-4,
        epochs=12,
        amp=True,
        precision="bf16",
        classes=["cat", "dog"],
        milestones=[3, 6],
        sizes=(1, 2),
        weights={"cat": 0.01, "dog": 2.0},
        seed=7,
        loader=LoaderCfg(batch_size=8, num_workers=2, shuffle=False),
    )
    assert type(cfg.lr) is float and type(cfg.epochs) is int and type(cfg.loader) is LoaderCfg
    assert all(type(m) is int for m in cfg.milestones)
    assert all(type(w) is float for w in cfg.weights.values())


def test_empty_file_and_null_section_give_defaults(tmp_path: Path) -> None:
    assert load_config(TrainCfg, write(tmp_path, "")) == TrainCfg()
    assert load_config(TrainCfg, write(tmp_path, "loader:\n")) == TrainCfg()


def test_optional_none_and_value(tmp_path: Path) -> None:
    assert load_config(TrainCfg, write(tmp_path, "seed: null\ntag: ~\n")).seed is None
    assert load_config(TrainCfg, write(tmp_path, "seed: '5'\n")).seed == 5


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainCfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainCfg, write(tmp_path, "- a\n- b\n"))


# -- overrides ----------------------------------------------------------------------------------


def test_dotted_overrides_after_file(tmp_path: Path) -> None:
    path = write(tmp_path, "epochs: 3\nloader:\n  batch_size: 64\n  num_workers: 4\n")
    cfg = load_config(
        TrainCfg, path, ["loader.batch_size=8", "lr=1e-4", "amp=true", "epochs=5", "epochs=6"]
    )
    assert cfg.loader == LoaderCfg(batch_size=8, num_workers=4, shuffle=True)  # file value kept
    assert cfg.lr == pytest.approx(1e-4) and type(cfg.lr) is float
    assert cfg.amp is True
    assert cfg.epochs == 6  # later overrides win


def test_override_into_empty_yaml_section(tmp_path: Path) -> None:
    cfg = load_config(TrainCfg, write(tmp_path, "loader:\n"), ["loader.batch_size=8"])
    assert cfg.loader.batch_size == 8


@pytest.mark.parametrize(
    ("override", "attr", "expected"),
    [
        ("classes=a,b , c", "classes", ["a", "b", "c"]),
        ("classes=[x, y]", "classes", ["x", "y"]),
        ("milestones=1,2,3", "milestones", [1, 2, 3]),
        ("sizes=[4, 5]", "sizes", (4, 5)),
        ("weights={a: 1e-4, b: 3}", "weights", {"a": 1e-4, "b": 3.0}),
        ("manifests.train=data/train.jsonl", "manifests", {"train": "data/train.jsonl"}),
        ("seed=null", "seed", None),
        ("seed=3", "seed", 3),
        ("tag=null", "tag", None),
        ("tag=v1", "tag", "v1"),
        ("precision=fp16", "precision", "fp16"),
        ("amp=1", "amp", True),
        ("amp=no", "amp", False),
        ("epochs=4.0", "epochs", 4),
    ],
)
def test_override_coercion(override: str, attr: str, expected: object) -> None:
    value = getattr(load_config(TrainCfg, None, [override]), attr)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["no", "007", "1.10", "null", "true", "", "a=b"])
def test_string_override_is_taken_verbatim(text: str) -> None:
    # YAML would read these as False, 7, 1.1, None, True: a str field must keep what was typed.
    assert load_config(TrainCfg, None, [f"name={text}"]).name == text


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match=r"'loader\.batch_size' is not of the form key=value"):
        load_config(TrainCfg, None, ["loader.batch_size"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainCfg, None, ["=3"])


def test_override_into_a_scalar_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        load_config(TrainCfg, write(tmp_path, "lr: 0.1\n"), ["lr.x=1"])
    with pytest.raises(ConfigError, match="lr: expected float"):
        load_config(TrainCfg, None, ["lr.x=1"])


# -- errors -------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, write(tmp_path, "epoch: 3\n"))
    msg = str(e.value)
    assert "'epoch'" in msg and "did you mean 'epochs'" in msg and str(tmp_path) in msg


def test_unknown_nested_key_names_closest() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, None, ["loader.batch_sz=8"])
    msg = str(e.value)
    assert "'batch_sz'" in msg and "did you mean 'batch_size'" in msg and "loader" in msg


def test_unknown_key_without_close_match_has_no_hint() -> None:
    with pytest.raises(ConfigError, match="unknown key 'zzzzzz'") as e:
        from_dict(TrainCfg, {"zzzzzz": 1})
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("epochs=many", "epochs"),
        ("epochs=2.5", "epochs"),
        ("epochs=.inf", "epochs"),
        ("epochs=true", "epochs"),
        ("lr=fast", "lr"),
        ("amp=maybe", "amp"),
        ("amp=2", "amp"),
        ("loader.num_workers=[1]", "num_workers"),
        ("milestones={a: 1}", "milestones"),
        ("milestones=1,x", "milestones"),
        ("weights=[1]", "weights"),
        ("weights={a: heavy}", "weights"),
        ("seed=abc", "seed"),
        ("loader=5", "loader"),
    ],
)
def test_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(TrainCfg, None, [override])


def test_string_field_rejects_a_mapping_from_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name: expected a string"):
        load_config(TrainCfg, write(tmp_path, "name: {a: 1}\n"))


def test_literal_error_lists_choices_and_closest() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, None, ["precision=bf61"])
    msg = str(e.value)
    assert "precision" in msg and "fp32" in msg and "did you mean 'bf16'" in msg


def test_missing_required_field() -> None:
    with pytest.raises(ConfigError, match="out"):
        load_config(Required)
    assert load_config(Required, None, ["out=x"]) == Required(out="x")


def test_validate_is_called_top_level_and_nested() -> None:
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        load_config(TrainCfg, None, ["epochs=0"])
    with pytest.raises(ValueError, match="loader.batch_size must be >= 1"):
        load_config(TrainCfg, None, ["loader.batch_size=0"])


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(TrainCfg, None, ["lr=1e-4", "loader.batch_size=8", "classes=a,b"])
    assert to_dict(cfg)["loader"] == {"batch_size": 8, "num_workers": 2, "shuffle": True}
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(TrainCfg, path) == cfg


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: 1\nb: [1, 2\nc: 3\n")

    @dataclass
    class Cfg:
        a: int = 0

    with pytest.raises(
        ConfigError, match=r"broken\.yaml:3:2: not valid YAML: while parsing a flow"
    ):
        load_config(Cfg, path)
