from __future__ import annotations

import re
from pathlib import Path

import pytest

from csaligner.cli import main
from csaligner.train import DataConfig, ModelConfig, RunConfig, TrainConfig, dump_yaml, load_config
from csaligner.train.overrides import split_cli_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(None, ["train.lr=3e-4", "model.image={kind: linear}", "loss.sigma=median"])
    again = load_config(write(tmp_path, dump_yaml(config)))
    assert again == config
    assert again.train.betas == (0.9, 0.999)  # tuples survive YAML lists


def test_numpy_scalars_in_a_config_written_in_code_dump_as_plain_numbers(tmp_path: Path) -> None:
    """A config built in Python with numpy numbers (np.float64 lr) ran but could not write config.yaml."""
    import dataclasses

    import numpy as np

    config = load_config(None, [])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=np.float64(3e-4)))
    assert load_config(write(tmp_path, dump_yaml(config))).train.lr == 3e-4


def test_yaml_sections_map_onto_dataclasses(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "data: {paired_fraction: 0.25, use_unpaired: false}\n"
        "model: {image: {kind: identity}, text: {kind: prior, num_layers: 2}}\n"
        "loss: {lam: 0.5, sigma: 2}\ntrain: {lr: 1e-4, steps: 7}\n",
    )
    c = load_config(path)
    assert c.data.paired_fraction == 0.25 and c.data.use_unpaired is False
    assert c.model.text == {"kind": "prior", "num_layers": 2}
    assert c.loss.lam == 0.5 and c.loss.sigma == 2.0 and isinstance(c.loss.sigma, float)
    assert c.train.lr == 1e-4 and isinstance(c.train.lr, float)  # PyYAML reads 1e-4 as a string
    assert c.train.steps == 7


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("trian: {lr: 1}\n", "trian"),
        ("train: {learning_rate: 1}\n", "train.learning_rate"),
        ("loss: {lamda: 1}\n", "loss.lamda"),
        ("data: {paired: 0.5}\n", "data.paired"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown key '{key}'.*valid keys: \[") as err:
        load_config(write(tmp_path, text))
    if key.startswith("train."):
        assert "'lr'" in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.paired_fraction=0", "paired_fraction must lie in \\(0, 1\\], got 0.0"),
        ("data.paired_fraction=1.5", "got 1.5"),
        ("train.lr=-1", "train.lr must be a finite number > 0, got -1.0"),
        ("train.precision=fp8", "train.precision must be one of .*got 'fp8'"),
        ("train.batch_size=1.5", "train.batch_size must be an integer, got '1.5'"),
        ("train.batch_size=0", "batch_size must be an integer >= 1, got 0"),
        ("train.ema=1", "ema must lie in \\[0, 1\\)"),
        ("train.device=tpu", "got 'tpu'"),
        ("data.use_unpaired=maybe", "must be true or false, got 'maybe'"),
        ("loss.lam=-0.1", "lam must be a finite number >= 0, got -0.1"),
        ("loss.sigma=0", "^loss: sigma must be a finite number > 0, got 0.0$"),  # the section the user wrote
        ("loss.temperature=0", "^loss: temperature must be"),
        ("train.lr=-1", "^train.lr must be"),  # already named: not "train: train.lr"
        ("loss.sigma=wide", "sigma.*'wide'"),
        ("model.image.kind=resnet", "model.image.kind must be one of .*got 'resnet'"),
        ("data.captions_per_image=all", 'captions_per_image_in_cs="one" is not possible'),
        ("loss.token_lam=0.1", "needs token features: set data.use_tokens=true"),
        ("train.betas=0.9", "train.betas must be a list of 2 values"),
    ],
)
def test_bad_values_name_the_value(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_both_sides_identity_is_rejected() -> None:
    with pytest.raises(ValueError, match="both identity: nothing to train"):
        ModelConfig(image={"kind": "identity"}, text={"kind": "identity"})


def test_dotted_overrides_coerce_to_field_types() -> None:
    c = load_config(
        None,
        [
            "train.lr=1e-4",
            "--loss.lam=0.1",
            "train.batch_size=32",
            "data.use_unpaired=false",
            "train.betas=0.8,0.95",
            "loss.sigma=median",
            "model.text.kind=prior",
            "model.text.num_layers=3",
            "train.resume=",
        ],
    )
    assert (c.train.lr, c.loss.lam, c.train.batch_size) == (1e-4, 0.1, 32)
    assert c.data.use_unpaired is False and c.train.betas == (0.8, 0.95) and c.loss.sigma == "median"
    assert c.model.text == {"kind": "prior", "num_layers": 3}  # a key set inside the default mapping
    assert c.train.resume == ""


def test_override_applies_on_top_of_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {image: {kind: mlp, bias: false}}\ntrain: {lr: 0.1}\n")
    c = load_config(path, ["model.image.kind=linear", "train.lr=0.2"])
    assert c.model.image == {"kind": "linear", "bias": False} and c.train.lr == 0.2


def test_malformed_override_is_explained() -> None:
    with pytest.raises(ValueError, match=r"--section\.key=value"):
        load_config(None, ["lr=1"])
    with pytest.raises(ValueError, match=r"--section\.key=value"):
        load_config(None, ["train.lr"])


def test_space_separated_cli_overrides() -> None:
    assert split_cli_overrides(["--train.lr", "1e-4", "--loss.lam=0.1"]) == ["train.lr=1e-4", "loss.lam=0.1"]
    with pytest.raises(ValueError, match="has no value"):
        split_cli_overrides(["--train.lr"])


def test_cli_flags_reach_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "train: {lr: 0.5}\n")
    rc = main(
        [
            "train",
            "--config",
            str(path),
            "--train.lr",
            "1e-4",
            "--loss.lam=0.25",
            "--model.image.kind=linear",
            "--print-config",
        ]
    )
    assert rc == 0
    printed = load_config(write(tmp_path, capsys.readouterr().out))
    assert printed.train.lr == 1e-4 and printed.loss.lam == 0.25 and printed.model.image == {"kind": "linear"}


def test_cli_bad_value_is_an_error_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--train.lr=fast", "--print-config"]) == 1
    assert "train.lr must be a number, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        (TrainConfig, "lr", True),
        (TrainConfig, "lr", "1e-4"),
        (TrainConfig, "batch_size", True),
        (TrainConfig, "weight_decay", True),
        (TrainConfig, "grad_clip", True),
        (TrainConfig, "warmup_fraction", True),
        (TrainConfig, "min_lr_ratio", True),
        (TrainConfig, "ema", False),
        (TrainConfig, "betas", (True, 0.999)),
        (TrainConfig, "seed", True),
        (DataConfig, "paired_fraction", True),
        (DataConfig, "unpaired_batch_size", True),
        (DataConfig, "token_images", True),
        (DataConfig, "split_seed", True),
        (ModelConfig, "out_dim", True),
    ],
)
def test_a_bool_or_string_for_a_number_is_an_error(section: type, field: str, value: object) -> None:
    """Python callers skip the YAML coercion: bool is an int subclass, so lr=True trained at lr 1.0."""
    with pytest.raises(ValueError, match=f"{field} must .*got {re.escape(repr(value))}"):
        section(**{field: value})


def test_section_defaults_are_valid() -> None:
    run = RunConfig()
    assert run.data == DataConfig() and run.train == TrainConfig()


SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_presets_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"flickr8k_infonce.yaml", "flickr8k_cs_aligner.yaml", "paper_defaults.yaml"} <= names
    assert any(n.startswith("flickr8k_t2i_") for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"csalign train --config configs/{path.name}" in first
    config = load_config(path)
    assert config.train.out_dir.startswith("runs/")
    assert config.data.image_cache.startswith("cache/") and config.data.text_cache.startswith("cache/")


def test_paper_defaults_match_the_paper() -> None:
    c = load_config(CONFIGS / "paper_defaults.yaml")
    assert (c.train.lr, c.train.batch_size, c.loss.lam, c.loss.sigma, c.loss.normalize) == (5e-5, 1024, 0.01, 1.0, True)
    assert c.loss.objective == "cs_aligner"


def test_t2i_presets_map_text_into_the_image_space() -> None:
    for path in CONFIGS.glob("flickr8k_t2i_*.yaml"):
        c = load_config(path)
        assert c.model.image["kind"] == "identity" and c.model.text["kind"] == "prior", path.name


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda v: TrainConfig(batch_size=v), "train.batch_size"),
        (lambda v: TrainConfig(seed=v), "train.seed"),
        (lambda v: DataConfig(token_images=v), "data.token_images"),
        (lambda v: ModelConfig(out_dim=v), "model.out_dim"),
    ],
)
def test_a_numpy_integer_is_refused_with_the_fix(make: object, field: str) -> None:
    """np.int64(64) is an integer: "must be an integer, got np.int64(64)" read as nonsense without the reason."""
    import numpy as np

    with pytest.raises(ValueError, match=rf"{re.escape(field)} must be an (integer|int).*pass int\(value\)"):
        make(np.int64(64))  # type: ignore[operator]


def test_a_numpy_integer_lora_rank_says_to_pass_int() -> None:
    import numpy as np

    from csaligner.encoders.lora import LoraTextConfig

    with pytest.raises(ValueError, match=r"LoRA rank r must be an integer >= 1, got np\.int64\(8\).*pass int\(value\)"):
        LoraTextConfig(r=np.int64(8))  # type: ignore[arg-type]


def test_a_numpy_float_for_an_integer_field_is_not_told_to_pass_float() -> None:
    """float(value) is refused by an integer field as well: the hint would send the user round in a circle."""
    import numpy as np

    from csaligner.adapters import AdapterConfig

    with pytest.raises(ValueError, match=r"train\.batch_size must be an integer >= 1, got np\.float32\(64\.0\)$"):
        TrainConfig(batch_size=np.float32(64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_layers must be a positive integer, got np\.float32\(2\.0\)$"):
        AdapterConfig("prior", 8, 8, num_layers=np.float32(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dropout must be .*pass float\(value\)"):  # a float field keeps its hint
        AdapterConfig("prior", 8, 8, dropout=np.float32(1.5))  # type: ignore[arg-type]


def test_invalid_yaml_is_an_error_naming_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML \(line 3, column 1: expected the node content"):
        load_config(bad, [])
    assert main(["train", "--config", str(bad)]) == 1  # an error line, not a parser traceback
    assert "bad.yaml is not valid YAML" in capsys.readouterr().err


def test_a_config_path_that_is_a_folder_says_so_and_lists_its_yaml_files(tmp_path: Path) -> None:
    """`--config configs` was reported as "does not exist", though the folder is right there."""
    (tmp_path / "a.yaml").write_text("train: {lr: 1.0e-3}\n")
    (tmp_path / "notes.txt").write_text("not a config\n")
    with pytest.raises(FileNotFoundError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert f"config file {str(tmp_path)!r} is a folder, not a YAML file" in message
    assert str(tmp_path / "a.yaml") in message and "notes.txt" not in message


def test_a_missing_config_names_the_yaml_files_beside_it_or_the_presets(tmp_path: Path) -> None:
    (tmp_path / "flickr8k_cs_aligner.yaml").write_text("train: {lr: 1.0e-3}\n")
    with pytest.raises(
        FileNotFoundError, match=r"does not exist; pass one of the YAML files in .*flickr8k_cs_aligner\.yaml"
    ):
        load_config(tmp_path / "cs_aligner.yaml")
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass a YAML preset such as configs/"):
        load_config(tmp_path / "no_folder" / "x.yaml")


def test_an_epochs_override_that_a_files_steps_would_ignore_is_refused(tmp_path: Path) -> None:
    """configs/flickr8k_unpaired.yaml sets train.steps=500: --train.epochs=1 silently trained 500 steps."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 500}\n")
    with pytest.raises(ValueError, match=r"train.epochs=1 would be ignored: .*c.yaml sets train.steps=500.*steps=0"):
        load_config(path, ["train.epochs=1"])
    assert load_config(path, ["train.epochs=1", "train.steps=0"]).train.epochs == 1  # the fix the error names
    assert load_config(path, ["train.epochs=1", "train.steps=20"]).train.steps == 20  # both given: steps win
    assert load_config(None, ["train.epochs=1", "train.steps=20"]).train.steps == 20
    assert load_config(path).train.steps == 500
