import pytest

from cptv_plugin import ModelStructure, discover_blocks, list_block_adapters
from cptv_plugin.models import create_reference_model


def test_vit_adapter_finds_blocks_in_forward_order():
    model = create_reference_model("fmnist_deit_tiny")
    adapter, blocks = discover_blocks(ModelStructure.from_module(model))
    assert adapter == "vit" and blocks == [f"blocks.{i}" for i in range(12)]
    assert "vit" in list_block_adapters()


def test_every_quantizer_is_in_exactly_one_group(tiny_vit, fmnist):
    from conftest import prepare_and_calibrate
    from cptv_plugin.fx.refine import FxSession

    session = FxSession(prepare_and_calibrate(tiny_vit, fmnist[0][:50], "W4A8"))
    in_groups = [h for g in session.groups for h in g.handles]
    assert len(in_groups) == len(set(map(id, in_groups))) == len(session.all_handles)
    names = {g.name: [h.name for h in g.handles] for g in session.groups}
    assert "patch_embed.proj.weight" in names["prefix"]
    assert "head.weight" in names["head"]
    assert all(n.startswith("blocks.1.") for n in names["blocks.1"] if n.endswith(".weight"))
    assert [g.segment for g in session.groups] == sorted(g.segment for g in session.groups)


def test_demo_prints_before_and_after(capsys):
    from cptv_plugin.cli import main

    main(["demo", "--calibration", "100", "--preset", "fast", "--passes", "1", "--gradient-steps", "20",
          "--test-images", "1000", "--json"])
    import json

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [row[0] for row in report["rows"]]
    assert names[0] == "fp32" and names[1].startswith("baseline") and names[2].startswith("cpt-v")
    assert all(0 < row[1] <= 100 for row in report["rows"])
    assert report["gradient_steps"] == 20 and report["passes"] == 1 and report["evaluations"] > 0
    assert report["test_images"] == 1000


def test_version_names_this_package_and_the_libraries_it_runs_on(capsys):
    import torch

    import cptv_plugin
    from cptv_plugin.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert "\n" not in printed  # one line, to paste into a bug report
    assert printed.startswith(f"cptv_plugin {cptv_plugin.__version__} (python ")
    assert f"torch {torch.__version__.split('+')[0]}" in printed and "timm " in printed
    assert "installed as" not in printed  # pyproject takes its version from cptv_plugin.__version__


def test_the_installed_version_is_the_package_version() -> None:
    from importlib import metadata

    import cptv_plugin

    assert metadata.version("cptv_plugin") == cptv_plugin.__version__


def test_refine_modelopt_refuses_a_wrong_path_as_a_usage_error_before_loading_anything(tmp_path, capsys):
    from cptv_plugin.cli import main

    source = tmp_path / "quantized.pth"
    common = ["--model", "cptv:fmnist_vit_tiny", "--calibration", "fashion-mnist"]
    source.write_bytes(b"not read")
    (tmp_path / "taken.pth").write_bytes(b"someone's file")
    out = tmp_path / "out.pth"
    for checkpoint, paths, message in (
            (tmp_path / "missing.pth", ["--out", out], "does not exist"),
            (source, ["--out", source], "never modifies its input"),
            (source, ["--out", tmp_path / "taken.pth"], "--overwrite"),
            (source, ["--out", out, "--onnx", source], "never modifies its input"),
            (source, ["--out", out, "--onnx", out], "its own path"),
            (source, ["--out", out, "--onnx", tmp_path / "taken.pth"], "--overwrite"),
            (source, ["--out", out, "--onnx", tmp_path], "is a folder")):
        with pytest.raises(SystemExit) as done:
            main(["refine-modelopt", str(checkpoint), *common, *map(str, paths)])
        assert done.value.code == 2  # argparse's usage error: a message, no traceback
        printed = capsys.readouterr().err
        assert "cptv refine-modelopt: error: " in printed and message in printed and "Traceback" not in printed
    assert source.read_bytes() == b"not read" and (tmp_path / "taken.pth").read_bytes() == b"someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized.pth", "taken.pth"]


@pytest.mark.parametrize("option, value, message", [
    ("--bits", "W9A3", "bit widths must be between 2 and 8"), ("--bits", "4bit", "must look like 'W4A8'"),
    ("--calibration", "0", "at least 1, got '0'"), ("--test-images", "many", "at least 1, got 'many'"),
    ("--passes", "0", "at least 1"), ("--gradient-steps", "-1", "at least 0")])
def test_demo_refuses_a_bad_setting_as_a_usage_error(option, value, message, capsys):
    from cptv_plugin.cli import main

    with pytest.raises(SystemExit) as done:
        main(["demo", option, value])
    assert done.value.code == 2
    printed = capsys.readouterr().err
    assert f"cptv demo: error: argument {option}: " in printed and message in printed


def test_each_command_says_which_preset_it_runs_unless_given(capsys):
    from cptv_plugin.cli import main

    for command, preset in (("demo", "fast"), ("refine-modelopt", "default")):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert f"search settings, '{preset}' unless given" in " ".join(capsys.readouterr().out.split())


def test_search_settings_come_from_a_config_file_and_the_options_override_it(tmp_path, monkeypatch, capsys):
    import dataclasses
    import json

    from cptv_plugin import SearchConfig
    from cptv_plugin.cli import main

    given = []
    monkeypatch.setattr("cptv_plugin.cli.run_demo", lambda bits, config, *args, **kwargs: given.append(config) or {})

    def demo_config(*options, settings=None):
        if settings is not None:
            (tmp_path / "settings.json").write_text(settings if isinstance(settings, str) else json.dumps(settings))
            options = ("--config", str(tmp_path / "settings.json"), *options)
        main(["demo", "--json", *options])
        return given.pop()

    assert demo_config() == SearchConfig.fast()  # the demo's preset unless given
    assert demo_config(settings={"preset": "fast", "gradient_steps": 0, "temperature": 0.2}, *("--passes", "2")) == \
        SearchConfig.fast(gradient_steps=0, temperature=0.2, passes=2)
    assert demo_config(settings={"passes": 4}) == SearchConfig.default(passes=4)  # no preset: the default's
    kept = dataclasses.asdict(SearchConfig.paper())  # a config someone kept, as JSON
    assert demo_config("--seed", "5", settings=kept) == SearchConfig.paper(seed=5)
    assert demo_config("--preset", "paper", settings={"preset": "fast", "seed": 3}) == SearchConfig.paper(seed=3)
    capsys.readouterr()

    for settings, message in (({"pases": 2}, "'pases' (did you mean 'passes'?)"), ("{not json", "Expecting"),
                              ([1, 2], "expected a JSON object"), ({"preset": "fastest"}, "unknown preset 'fastest'"),
                              ({"population": 0}, "population must be >= 1")):
        with pytest.raises(SystemExit) as done:
            demo_config(settings=settings)
        assert done.value.code == 2  # a usage error: the message, no traceback
        printed = capsys.readouterr().err
        assert "cptv demo: error: --config " in printed and message in printed and "Traceback" not in printed
    (tmp_path / "quantized.pth").write_bytes(b"not read")
    with pytest.raises(SystemExit):
        main(["refine-modelopt", str(tmp_path / "quantized.pth"), "--model", "m", "--calibration", "c",
              "--out", str(tmp_path / "out.pth"), "--config", str(tmp_path / "missing.json")])
    assert "cptv refine-modelopt: error: --config " in (printed := capsys.readouterr().err) and "No such file" in printed
    assert not given
