"""`llama-conformance` (conformance/cli.py): the pytest command line it builds, without running the battery, and the
packaging that names it (pyproject.toml's console script and pytest11 entry point), and how the plugin lays out
`-n N` (modules per worker, each worker's share of the cores).

(No argument here may be named `mesh`, `dtype` or `reference`: the suite's plugin parametrizes those.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conformance import cli

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
    from conformance import doctor

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
    from conformance import doctor

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

    from conformance import plugin

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

    from conformance import plugin

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

    from conformance import plugin

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
    from conformance import plugin

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
