import pytest
import yaml

from cmg_core.config import RunConfig, load_config, save_config, to_dict
from cmg_core.errors import ConfigError


def test_defaults_and_roundtrip(tmp_path):
    cfg = load_config(overrides=["task.n_normal=3", "e2.epochs=7", "cmle.n_neighbors=null", "train.methods=[ssd,cmg]"])
    assert cfg.e2.epochs == 7 and cfg.cmle.n_neighbors is None and cfg.train.methods == ("ssd", "cmg")
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert to_dict(again)["train"]["methods"] == ["ssd", "cmg"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.methods=[ssd,foo]", "unknown method"),
        ("cmer.n_regions=8", "not a square number"),
        ("cmer.mask=fuzzy", "hard"),
        ("e2.nope=1", "unknown config key"),
        ("e2.epochs=abc", "expects int"),
        ("detector.covariance=magic", "pinv"),
        ("model.profile=gpu", "profile"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/ should ship example configs"
    for f in files:
        assert isinstance(load_config(f), RunConfig), f
        assert isinstance(yaml.safe_load(f.read_text()), dict)


def test_float_keys_accept_exponent_notation_and_name_the_key_when_wrong():
    """YAML 1.1 reads `1e-3` as a string; a float key converts it, and a bad value names key and type."""
    from cmg_core.config import load_config
    from cmg_core.errors import ConfigError

    assert load_config("configs/ucm_captions_scratch.yaml", ["e2.lr=1e-3"]).e2.lr == 1e-3
    with pytest.raises(ConfigError, match=r"'e2.lr' expects a number \(float\), got 'fast'"):
        load_config("configs/ucm_captions_scratch.yaml", ["e2.lr=fast"])
    with pytest.raises(ConfigError, match="e2.guidance_on"):
        load_config("configs/ucm_captions_scratch.yaml", ["e2.guidance_on=both"])


def test_every_subcommand_help_works(capsys):
    """`cmg --help` and `cmg <subcommand> --help` print help (a stray % in a help text used to crash them)."""
    import argparse

    from cmg_core.cli import build_parser

    def subparsers(p):
        return [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]

    parser = build_parser()
    commands = [[]]
    for name, sub in subparsers(parser)[0].choices.items():
        commands.append([name])
        commands += [[name, inner] for s in subparsers(sub) for inner in s.choices]  # e.g. cmg data pack
    assert len(commands) > 5
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: cmg" in capsys.readouterr().out
