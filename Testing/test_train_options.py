"""The one table of training options against fusioninn train, the Slicer CLI XML and TrainingConfig."""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import ctk_cli
import pytest

from FusionINNLib.cli import build_parser
from FusionINNLib.train import options as table
from FusionINNLib.train.training import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
XML_FILE = REPO / "FusionINNTraining" / "FusionINNTraining.xml"
SCRIPT = REPO / "FusionINNTraining" / "FusionINNTraining.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("FusionINNTrainingScript", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def train_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["train"]


def test_the_xml_is_generated_from_the_table_byte_for_byte():
    assert XML_FILE.read_bytes() == table.slicer_xml().encode("utf-8"), (
        "FusionINNTraining.xml differs from the option table: run "
        "python -m FusionINNLib.train.options --write-xml FusionINNTraining/FusionINNTraining.xml")


def test_every_slicer_parameter_is_the_camel_case_of_a_fusioninn_train_option():
    help_text = subprocess.run([sys.executable, "-m", "FusionINNLib.cli", "train", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    train_flags = {s for a in train_parser()._actions for s in a.option_strings}
    module = ctk_cli.CLIModule(str(XML_FILE))
    returns = {name for _, name, _, _, _ in table.RETURN_VALUES}
    options = {o.slicer_name: o for o in table.OPTIONS if o.slicer}
    xml_names = [p.name for p in module.parameters() if p.name not in returns]
    assert sorted(xml_names) == sorted(options)
    for parameter in module.parameters():
        if parameter.name in returns:
            continue
        option = options[parameter.name]
        assert parameter.name == table.slicer_name(option.flag)
        if parameter.index is None:
            assert parameter.longflag.lstrip("-") == parameter.name
        if option.index == 0:
            assert option.metavar in help_text  # DATA_DIR, the positional
        else:
            assert "--" + option.flag in train_flags and "--" + option.flag in help_text
    assert table.slicer_name("--latent-weight") == "latentWeight"
    assert options["learningRate"].flag == "learning-rate" and "lr" in options["learningRate"].aliases


def test_every_training_config_field_is_an_option_or_named_as_not_exposed():
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    in_table = {o.field for o in table.OPTIONS if o.field is not None}
    assert in_table | set(table.NOT_EXPOSED) == set(fields)
    assert not in_table & set(table.NOT_EXPOSED)
    defaults = TrainingConfig(data_dir="d", output="m.pt")
    for option in table.OPTIONS:
        if option.field in (None, "data_dir", "output") or option.pair_index is not None:
            continue
        expected = getattr(defaults, option.field)
        default = tuple(option.default) if isinstance(option.default, (list, tuple)) else option.default
        assert default == expected, f"{option.flag}: table default {option.default!r}, TrainingConfig {expected!r}"
    # the lead's newest options are in the table, in both front ends
    for flag in ("gradient-weight", "piella-weight", "init-model", "max-train-slices", "latent-weight",
                 "modality-weights", "adaptive-weights", "subnet-final-relu", "num-workers"):
        assert flag in table.by_flag() and table.by_flag()[flag].slicer


def test_choices_agree_with_the_library():
    from FusionINNLib.core.engine import DEVICES
    from FusionINNLib.core.losses import LATENT_LOSSES, PRIORS
    from FusionINNLib.core.normalization import MODES
    from FusionINNLib.io.brats import MODALITY_ALIASES

    assert table.PRIORS == PRIORS and table.LATENT_LOSSES == LATENT_LOSSES and table.NORMALIZATIONS == MODES
    assert table.DEVICES == DEVICES
    assert set(table.MODALITIES) == {m for m in MODALITY_ALIASES if m != "seg"}


def test_old_spellings_are_aliases_of_the_new_ones():
    parser = train_parser()
    old = parser.parse_args(["data", "-o", "m.pt", "--lr", "0.001", "--lam", "0.6", "--val-fraction", "0.3",
                             "--max-val-slices", "5", "--modalities", "flair", "t2"])
    new = parser.parse_args(["data", "--output", "m.pt", "--learning-rate", "0.001", "--lambda-ssim", "0.6",
                             "--validation-fraction", "0.3", "--max-validation-slices", "5", "--modality1", "flair",
                             "--modality2", "t2"])
    assert table.config_from_cli(old) == table.config_from_cli(new)
    config = TrainingConfig(**table.config_from_cli(new))
    assert (config.lr, config.lam, config.val_fraction, config.max_val_slices, config.modalities) == (
        0.001, 0.6, 0.3, 5, ("flair", "t2"))


SETTINGS = {  # flag -> (fusioninn train value(s), Slicer value)
    "epochs": ("7", "7"), "batch-size": ("4", "4"), "learning-rate": ("0.002", "0.002"),
    "lambda-ssim": ("0.7", "0.7"), "alpha": ("0.4", "0.4"), "blocks": ("2", "2"), "prior": ("uniform", "uniform"),
    "latent-loss": ("moments", "moments"), "latent-weight": ("0.3", "0.3"), "gradient-weight": ("0.25", "0.25"),
    "piella-weight": ("0.5", "0.5"),
    "modality-weights": (["0.7", "0.3"], "0.7,0.3"), "validation-fraction": ("0.5", "0.5"), "seed": ("5", "5"),
    "max-cases": ("3", "3"), "max-train-slices": ("9", "9"), "max-validation-slices": ("4", "4"),
    "crop-size": ("32", "32"), "intensity-jitter": ("0.1", "0.1"), "grad-clip": ("2.5", "2.5"),
    "early-stopping": ("3", "3"), "patience": ("2", "2"), "num-workers": ("1", "1"), "labels": ("brain", "brain"),
    "normalization": ("slice", "slice"), "device": ("cpu", "cpu"), "init-model": ("/m/init.pt", "/m/init.pt"),
    "run-dir": ("/r", "/r"), "cache-dir": ("/c", "/c"), "history-table": ("/h.tsv", "/h.tsv"),
    "modality1": ("flair", "flair"), "modality2": ("t1", "t1"),
}
FLAGS = ("amp", "adaptive-weights", "subnet-final-relu")


def test_both_command_lines_make_the_same_training_config(script):
    cli_args = ["/data", "-o", "/m/out.pt"]
    slicer_args = []
    for flag, (cli_value, slicer_value) in SETTINGS.items():
        cli_args += ["--" + flag] + (cli_value if isinstance(cli_value, list) else [cli_value])
        slicer_args += ["--" + table.slicer_name(flag), slicer_value]
    for flag in FLAGS:
        cli_args.append("--" + flag)
        slicer_args.append("--" + table.slicer_name(flag))
    from_cli = TrainingConfig(**table.config_from_cli(train_parser().parse_args(cli_args)))
    from FusionINNLib.train import training

    namespace = script.build_parser().parse_args(slicer_args + ["/data", "/m/out.pt"])
    from_slicer = script.training_config(namespace, training)
    assert from_slicer.to_dict() == from_cli.to_dict()
    assert from_cli.gradient_weight == 0.25 and from_cli.piella_weight == 0.5
    assert from_cli.init_model == "/m/init.pt" and from_cli.max_train_slices == 9
    assert from_cli.modality_weights == (0.7, 0.3) and from_cli.adaptive_weights and from_cli.subnet_final_relu
    # Slicer's "0 = not set" reaches the config as None, like an omitted fusioninn train option
    unset = script.training_config(script.build_parser().parse_args(["--maxCases", "0", "--gradClip", "0", "/d",
                                                                     "/m.pt"]), training)
    default = TrainingConfig(**table.config_from_cli(train_parser().parse_args(["/d", "-o", "/m.pt"])))
    assert unset.to_dict() == default.to_dict()


@pytest.mark.parametrize("flag, value", [("blocks", "7"), ("lambda-ssim", "1.5"), ("validation-fraction", "0.95"),
                                         ("learning-rate", "0"), ("intensity-jitter", "0.6"), ("epochs", "0"),
                                         ("gradient-weight", "-1"), ("piella-weight", "-0.5"),
                                         ("max-train-slices", "-2")])
def test_one_bound_per_option_in_both_command_lines(script, flag, value, capsys):
    with pytest.raises(SystemExit):
        train_parser().parse_args(["d", "-o", "m.pt", "--" + flag, value])
    assert "--" + flag in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.build_parser().parse_args(["--" + table.slicer_name(flag), value, "d", "m.pt"])
    assert table.slicer_name(flag) in capsys.readouterr().err
