"""`llama-conformance` (conformance/cli.py): the pytest command line it builds, without running the battery, and the
packaging that names it (pyproject.toml's console script and pytest11 entry point), how the plugin lays out
`-n N` (modules per worker, each worker's share of the cores), the option mistakes it refuses before collection, and
the suite's other commands given a bad input file.

(No argument here may be named `mesh`, `dtype` or `reference`: the suite's plugin parametrizes those.)
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from conformance import cli, doctor, plugin

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def test_arguments_for_an_implementation_and_a_report(tmp_path):
    root = tmp_path / "site-packages"
    args = cli.pytest_args(["--impl", "mypkg.adapter:Mine", "--report", "out/parity.html", "--json", "out/p.json",
                            "-k", "rmsnorm", "-n", "2"], cwd=tmp_path, root=root)
    assert args == ["-p", "conformance.plugin", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(root),
                    "-W", cli.QUIET_REWRITE, "-m", cli.DEFAULT_MARKERS, "--impl", "mypkg.adapter:Mine",
                    "--parity-report", str(tmp_path / "out" / "parity.html"),
                    "--parity-json", str(tmp_path / "out" / "p.json"), "-k", "rmsnorm", "-n", "2",
                    "--pyargs", "conformance"]


def test_markers_modules_and_absolute_paths(tmp_path):
    report = tmp_path / "elsewhere" / "r.html"
    args = cli.pytest_args(["-m", "ecosystem", "--module", "test_rmsnorm", "--module", "conformance.test_rope",
                            "--report", str(report), "--mesh", "1x4"], cwd="/somewhere", root=tmp_path)
    assert cli.DEFAULT_MARKERS not in args and args.count("-m") == 1
    assert args[args.index("--parity-report") + 1] == str(report)
    assert args[-3:] == ["--pyargs", "conformance.test_rmsnorm", "conformance.test_rope"]
    assert args[args.index("--mesh") + 1] == "1x4" and "--impl" not in args
    assert cli.DEFAULT_MARKERS not in cli.pytest_args(["-mslow"], cwd=tmp_path, root=tmp_path)


def test_default_root_is_where_the_package_lives():
    assert (cli.installed_root() / "conformance" / "cli.py").is_file()
    args = cli.pytest_args([], cwd=REPO)
    assert args[args.index("--rootdir") + 1] == str(cli.installed_root())


def test_main_runs_pytest_with_the_current_directory_importable(tmp_path, monkeypatch):
    seen = {}

    def fake_main(args):
        seen["args"], seen["path"] = list(args), list(sys.path)
        return 3

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.setattr(pytest, "main", fake_main)
    assert cli.main(["--impl", "x:Y", "-q"]) == 3
    assert seen["args"] == cli.pytest_args(["--impl", "x:Y", "-q"], cwd=tmp_path)
    assert seen["path"][-1] == str(tmp_path)  # appended: the suite's own packages are found first


def test_doctor_runs_the_doctor_not_pytest(tmp_path, monkeypatch):
    """`llama-conformance doctor ARGS` hands ARGS to conformance/doctor.py, the current directory importable."""
    seen = {}

    def fake_doctor(args):
        seen["args"], seen["path"] = list(args), list(sys.path)
        return 1

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.setattr(doctor, "main", fake_doctor)
    monkeypatch.setattr(pytest, "main", lambda args: pytest.fail(f"pytest ran: {args}"))
    assert cli.main(["doctor", "--impl", "x:Y"]) == 1
    assert seen["args"] == ["--impl", "x:Y"] and seen["path"][-1] == str(tmp_path)


def test_doctor_past_the_first_argument_goes_to_pytest(tmp_path, monkeypatch):
    ran = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(doctor, "main", lambda args: pytest.fail(f"the doctor ran: {args}"))
    monkeypatch.setattr(pytest, "main", lambda args: ran.append(list(args)) or 0)
    assert cli.main(["-k", "doctor"]) == 0
    assert ran == [cli.pytest_args(["-k", "doctor"], cwd=tmp_path)]


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.pytest_args(["--help"], cwd=".")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--impl" in out and "--report" in out and "--module" in out and "doctor --impl" in out


def test_pyproject_names_the_command_and_the_plugin():
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("an installed copy of the suite: pyproject.toml is the repository's")
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    assert project["scripts"]["llama-conformance"] == "conformance.cli:main"
    # named like the module, so that the root conftest's pytest_plugins finds it registered (no double registration)
    assert project["entry-points"]["pytest11"] == {cli.PLUGIN: cli.PLUGIN}
    assert f'pytest_plugins = ["{cli.PLUGIN}"]' in (REPO / "conftest.py").read_text()


def test_the_installed_default_selection_and_markers_are_the_repository_ini():
    """Run from another directory there is no pytest.ini: the command's -m and the plugin's markers stand in for it."""
    import configparser


    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    assert f'-m "{cli.DEFAULT_MARKERS}"' in ini["pytest"]["addopts"]
    declared = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].strip().splitlines()}
    assert declared == set(plugin.MARKERS)


@pytest.mark.parametrize("args, env, expected", [
    (["-n", "2"], "", "loadfile"),
    (["-n", "2", "--dist", "load"], "", "load"),
    (["-n", "2", "--dist=worksteal"], "", "load"),  # a mode of the user's: left as xdist set it
    (["-n", "2"], "--dist load", "load"),
])
def test_workers_take_whole_modules_unless_the_user_chose_a_mode(monkeypatch, args, env, expected):
    from types import SimpleNamespace


    monkeypatch.setenv("PYTEST_ADDOPTS", env)
    config = SimpleNamespace(option=SimpleNamespace(dist="load"), invocation_params=SimpleNamespace(args=args))
    plugin._distribute_by_module(config)
    assert config.option.dist == expected
    # the suite's loadfile sends the modules in collection order; a mode of the user's keeps xdist's own options
    assert getattr(config.option, "loadscopereorder", True) is (expected != "loadfile")


@pytest.mark.parametrize("workers, cores, preset, expected", [
    (2, 2, None, "1"),     # the default run on 2 cores: one thread per worker
    (2, 8, None, "4"),
    (4, 2, None, "1"),     # more workers than cores: still one
    (2, 2, "3", "3"),      # the user's setting is kept
    (None, 2, None, None),  # no -n: one process, its pools left alone
])
def test_workers_share_the_cores_of_their_openmp_and_blas_pools(monkeypatch, workers, cores, preset, expected):
    from types import SimpleNamespace


    if preset is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    monkeypatch.setattr(plugin, "_usable_cores", lambda: cores)
    plugin._share_cores_among_workers(SimpleNamespace(option=SimpleNamespace(numprocesses=workers)))
    assert os.environ.get("OMP_NUM_THREADS") == expected


@pytest.mark.e2e
def test_a_worker_starts_with_its_share_of_the_cores(pytester, monkeypatch):
    """The variable reaches the workers (set before xdist starts them), and their torch reads it."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = max(1, plugin._usable_cores() // 2)
    pytester.makeconftest('pytest_plugins = ["conformance.plugin"]')
    pytester.makepyfile(test_threads=f"""
import os

import torch


def test_threads():
    assert os.environ.get("OMP_NUM_THREADS") == "{share}", os.environ.get("OMP_NUM_THREADS")
    assert torch.get_num_threads() == {share}
""")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# ---- option mistakes: one line and exit status 4 (usage error) before collection ------------------------------

def _option(**given):
    from types import SimpleNamespace

    defaults = dict(cpu_devices=8, mutant=None, parity_update_baseline=False, parity_json=None, parity_report=None,
                    parity_baseline=None)
    return SimpleNamespace(**{**defaults, **given})


@pytest.mark.parametrize("given, complaint", [
    (dict(cpu_devices=0), "--cpu-devices 0: must be at least 1"),
    (dict(mutant="rope_unscaled", parity_update_baseline=True, parity_baseline="b.json"),
     "--mutant rope_unscaled with --parity-update-baseline would record a planted bug as the baseline"),
    (dict(parity_json="out/p.json", parity_report="out/../out/p.json"),
     "--parity-json and --parity-report both name out/../out/p.json"),
    (dict(parity_json="b.json", parity_baseline="b.json"), "--parity-json and --parity-baseline both name b.json"),
])
def test_conflicting_options_are_a_usage_error(given, complaint):
    with pytest.raises(pytest.UsageError, match="^" + re.escape(complaint)):
        plugin._check_option_conflicts(_option(**given))


def test_options_that_go_together_pass():
    plugin._check_option_conflicts(_option(mutant="rope_unscaled", parity_json="p.json", parity_report="r.html",
                                           parity_baseline="b.json"))
    plugin._check_option_conflicts(_option(parity_update_baseline=True, parity_baseline="b.json", cpu_devices=1))


@pytest.mark.parametrize("meshes, devices, changes, complaint", [
    (["1x4", "3x3"], 8, {}, "--mesh 3x3 needs 9 devices but this run simulates 8 CPU devices: give --cpu-devices 9"),
    (["1x3"], 8, {}, "--mesh 1x3: tiny: cannot shard over a model axis of 3: n_heads=8 is not divisible"),
    (["1x6"], 8, dict(dim=192, n_heads=12, n_kv_heads=4), "n_kv_heads=4 and the model axis 6 divide neither way"),
    (["1x4"], 8, dict(vocab_size=510), "vocab_size=510 is not divisible by the model axis 4"),
    (["1x16"], None, {}, "n_heads=8 is not divisible by the model axis 16"),
    (["1-4"], 8, {}, "--mesh '1-4': expected DxM"),
    (["0x4"], 8, {}, "--mesh: mesh '0x4' is not of the form DxM with positive integers"),
])
def test_a_mesh_the_run_cannot_use_is_a_usage_error(tiny_config, meshes, devices, changes, complaint):
    with pytest.raises(pytest.UsageError, match=re.escape(complaint)):
        plugin._check_meshes(meshes, devices, {"tiny": tiny_config.replace(**changes)})


def test_meshes_the_run_can_use_pass(tiny_config):
    plugin._check_meshes(["1x1", "1x4", "2x4", "1x8"], 8, {"tiny": tiny_config})
    plugin._check_meshes(["4x4"], None, {"tiny": tiny_config})  # an accelerator's count is not known yet


@pytest.mark.e2e
def test_a_mesh_larger_than_the_devices_stops_pytest_with_one_line():
    import subprocess

    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-q", "--mesh", "3x3",
                          "conformance/test_rmsnorm.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert run.stderr.strip() == ("ERROR: --mesh 3x3 needs 9 devices but this run simulates 8 CPU devices: give "
                                  "--cpu-devices 9 or a smaller mesh"), run.stderr
    assert "collected" not in run.stdout


# ---- every command given a bad input file: one line naming it, exit status 2 ------------------------------------

def _command(name):
    """(main, argv for the bad input) of a command that reads a JSON file or a checkpoint directory."""
    import importlib

    module, _, flag = name.partition(" ")
    main = importlib.import_module(module).main
    if module in ("llama_spec.checkpoint", "tp_llama.generate", "reference.generation", "benchmarks.checkpoint_memory"):
        extra = {"llama_spec.checkpoint": ["--no-scan"], "tp_llama.generate": ["--prompt", "Hello", "--mesh", "1x1"],
                 "reference.generation": ["--prompt", "Hello", "--reference", "hf"],
                 "benchmarks.checkpoint_memory": []}[module]
        return main, lambda file: ([str(file.parent)] if module == "llama_spec.checkpoint"
                                   else ["--checkpoint-dir", str(file.parent)]) + extra
    extra = {"parity.report_cli": ["-o", "out.html"]}.get(module, [])
    return main, lambda file: ([flag, str(file)] if flag else [str(file)]) + extra


COMMANDS_READING_FILES = ["parity.calibrate", "parity.scoreboard", "parity.scoreboard --diagnoses",
                          "benchmarks.drawn_bounds --records", "parity.report_cli", "llama_spec.checkpoint",
                          "tp_llama.generate", "reference.generation", "benchmarks.checkpoint_memory"]


@pytest.mark.parametrize("problem", ["missing", "not_json", "not_an_object", "wrong_object"])
@pytest.mark.parametrize("command", COMMANDS_READING_FILES)
def test_a_command_given_a_bad_file_prints_one_line_and_exits_2(tmp_path, capsys, command, problem):
    """Checkpoint directories get the bad file as their params.json (beside an empty consolidated.00.pth)."""
    main, argv = _command(command)
    directory = tmp_path / ("missing" if problem == "missing" else "given")
    checkpoint = not command.partition(" ")[0].endswith(("calibrate", "scoreboard", "drawn_bounds", "report_cli"))
    file = directory / ("params.json" if checkpoint else "records.json")
    if problem != "missing":
        directory.mkdir()
        file.write_text({"not_json": "{", "not_an_object": "[1, 2]", "wrong_object": '{"environment": {}}'}[problem])
        if checkpoint:
            (directory / "consolidated.00.pth").write_bytes(b"")
    if command.startswith("parity.scoreboard --diagnoses"):  # the main file good, the --diagnoses one bad
        good = tmp_path / "good.json"
        good.write_text('{"environment": {}, "records": []}')
        code = main([str(good), *argv(file)])
    else:
        code = main(argv(file))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    named = directory if problem == "missing" else file
    assert re.match(r"(python -m \S+: )?error: ", lines[0]) and str(named) in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("module", ["adapters.keras_hub.collectives", "parity.scoreboard"])
def test_help_describes_the_command_in_whole_sentences(capsys, module):
    """(keras is not needed for --help.) The descriptions were the docstrings' first lines, cut mid-sentence."""
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())
    assert description.endswith(".") and len(description) > 60, description


def test_the_default_selection_leaves_out_the_slow_and_ecosystem_modules_by_their_marks():
    """Read from the modules' `pytestmark` (not imported), against pytest.ini's -m and against others."""
    default = plugin.deselected_by_marks("not slow and not browser and not multihost and not ecosystem and not e2e "
                                  "and not real_full")
    assert default == {"conformance/test_8b_width.py": ["slow"], "conformance/test_ecosystem.py": ["ecosystem"],
                       "conformance/test_ecosystem_easydel.py": ["ecosystem"],
                       "conformance/test_ecosystem_penzai.py": ["ecosystem"],
                       "conformance/test_ecosystem_torchax.py": ["ecosystem"]}
    assert plugin.deselected_by_marks("ecosystem") == {"conformance/test_8b_width.py": ["slow"]}
    assert plugin.deselected_by_marks("") == {} and plugin.deselected_by_marks("not (") == {}

