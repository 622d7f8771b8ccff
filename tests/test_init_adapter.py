"""`llama-conformance init-adapter` (conformance/init_adapter.py): each style's skeleton imports and builds as written,
the doctor reports its every capability missing, an existing file is kept without --force, a usage error is one line
and exit status 2; and examples/nnx_llama, an adapter grown from the nnx skeleton, comes out of the doctor clean.
"""
from __future__ import annotations

import importlib

import pytest

from conformance import cli, doctor, init_adapter


def _write(tmp_path, style: str, *extra: str) -> int:
    return init_adapter.main(["--style", style, "--out", str(tmp_path / f"skeleton_{style}.py"), "--name", "Sk",
                              *extra])


@pytest.mark.parametrize("style", init_adapter.STYLES)
def test_a_skeleton_imports_and_the_doctor_finds_every_capability_missing(tmp_path, monkeypatch, style):
    assert _write(tmp_path, style) == 0
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(f"skeleton_{style}")
    assert module.TAPS.suite_name("layers.3.q_rope" if style != "linen" else "layers_3.q_rope") == "layers.3.q_rope"
    report = doctor.diagnose(f"skeleton_{style}:Sk")
    assert {f.verdict for f in report.findings.values()} == {"missing"}, report.table()
    assert report.exit_status() == 1


def test_an_existing_file_is_kept_unless_forced(tmp_path, capsys):
    out = tmp_path / "skeleton_nnx.py"
    out.write_text("mine\n")
    assert _write(tmp_path, "nnx") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--force" in err[0]
    assert out.read_text() == "mine\n"
    assert _write(tmp_path, "nnx", "--force") == 0
    assert "class Sk:" in out.read_text()


@pytest.mark.parametrize("argv, complaint", [
    (["--style", "torch", "--out", "{tmp}/a.py"], "invalid choice: 'torch'"),
    (["--style", "nnx"], "--out"),
    (["--style", "nnx", "--out", "{tmp}/no/such/dir/a.py"], "does not exist"),
    (["--style", "nnx", "--out", "{tmp}/a.txt"], "must end in .py"),
    (["--style", "nnx", "--out", "{tmp}/a.py", "--name", "my-adapter"], "not a Python identifier"),
])
def test_a_usage_error_is_one_line_and_exit_status_2(tmp_path, capsys, argv, complaint):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = init_adapter.main(argv)
    except SystemExit as done:  # argparse's own errors go through parser.error
        code = done.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and complaint in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_the_command_dispatches_init_adapter(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init-adapter", "--style", "jnp", "--out", "adapter.py"]) == 0
    assert "class MyLlamaAdapter:" in (tmp_path / "adapter.py").read_text()
    assert "llama-conformance doctor --impl MODULE:MyLlamaAdapter" in capsys.readouterr().out


def test_the_nnx_example_grown_from_the_skeleton_is_clean():
    report = doctor.diagnose("examples.nnx_llama.adapter:NNXLlamaAdapter")
    assert {c for c, f in report.findings.items() if f.verdict != "ok"} == set(), report.table()
    assert report.exit_status() == 0
