"""`llama-conformance doctor` (conformance/doctor.py) in-process: the built-in adapter comes out clean, every adapter
of examples/broken comes out wrong where its fault is, with the fix, and nowhere else. One doctor run per adapter.
"""
from __future__ import annotations

import functools
import pkgutil
import re

import pytest

import examples.broken
from adapters import protocol
from conformance import doctor, plugin
from tp_llama.adapter import TPLlamaAdapter

# examples/broken adapter -> {each capability the doctor must find wrong: a phrase of the fix it must name}
BROKEN = {
    "all_gather:AllGatherAdapter": {"compiled_forward": "wo and w2 row-parallel",
                                    "parameters": "wo and w2 on their input features (row-parallel)"},
    "ignores_mesh:IgnoresMeshAdapter": {"compiled_forward": "run the program on the mesh build() receives",
                                        "parameters": "place every parameter on the mesh build() receives"},
    "float32_compute:Float32ComputeAdapter": {"forward": "keep the weights in bfloat16 and compute in bfloat16",
                                              "parameters": "place the weights in bfloat16"},
    "half_layout_rope:HalfLayoutRoPEAdapter": {"forward": "llama_spec.convert.halves_to_interleaved_last_axis(x)"},
    "float32_intermediates:Float32IntermediatesAdapter": {"forward": "return them in bfloat16"},
    "unreplicated_kv:UnreplicatedKVAdapter": {"parameters": "replicate the kv heads",
                                              "compiled_forward": "kv heads replicated"},
    "renamed_parameter:RenamedParameterAdapter": {"parameters": "rename 'lm_head.weight' to 'output.weight'"},
}


@functools.cache
def _report(spec: str) -> doctor.Report:
    return doctor.diagnose(spec)


def _wrong(report: doctor.Report) -> set[str]:
    return {capability for capability, found in report.findings.items() if found.verdict == "wrong"}


def test_the_builtin_adapter_is_clean(monkeypatch, capsys):
    """Through the command's main: every capability ok, exit status 0."""
    monkeypatch.setattr(plugin, "_simulate_cpu_devices", lambda count: None)  # this session's JAX has started
    assert doctor.main(["--impl", protocol.BUILTIN]) == 0
    out = capsys.readouterr().out
    assert [c for c in protocol.CAPABILITIES if not re.search(rf"^{c} +ok\b", out, re.M)] == [], out
    assert "every capability present keeps the protocol" in out and "exit status 0" in out


def test_every_broken_adapter_is_checked_here():
    assert {m.name for m in pkgutil.iter_modules(examples.broken.__path__)} == {s.split(":")[0] for s in BROKEN}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_adapter_is_wrong_where_its_fault_is_with_the_fix(name):
    report = _report(f"examples.broken.{name}")
    assert report.exit_status() == 1
    assert _wrong(report) == set(BROKEN[name]), report.table()
    for capability, fix in BROKEN[name].items():
        assert any(fix in text for text in report.fixes(capability)), report.table()


def test_the_fixes_are_printed():
    """The table names the capability, the verdict, the problem and its fix; the layout fault on both meshes."""
    table = _report("examples.broken.half_layout_rope:HalfLayoutRoPEAdapter").table()
    assert re.search(r"^forward +wrong\b", table, re.M) and re.search(r"^rope +ok\b", table, re.M)
    assert "- layers.0.q_rope, layers.1.q_rope come back in HF's rotate-half layout (i, i + head_dim/2) " \
           "[1x1 float32, 1x4 bfloat16]" in table
    assert "  fix: return Meta's interleaved pairs (2i, 2i+1)" in table
    assert "\nwrong: forward (" in table and table.endswith("exit status 1")


class ForwardOnly:
    """The built-in adapter with nothing but forward: every optional capability missing."""

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def build(cls, config, weights, mesh, dtype):
        return cls(TPLlamaAdapter.build(config, weights, mesh, dtype))

    def forward(self, tokens, start_pos=0, capture=False):
        return self.inner.forward(tokens, start_pos, capture)


class NoForward:
    @classmethod
    def build(cls, config, weights, mesh, dtype):
        return cls()


def test_missing_optional_capabilities_are_not_errors():
    report = doctor.diagnose(f"{__name__}:ForwardOnly")
    assert report.findings["forward"].verdict == "ok" and report.exit_status() == 0, report.table()
    assert {c for c, f in report.findings.items() if f.verdict == "missing"} == set(protocol.CAPABILITIES) - {
        "forward"}
    assert "not checked: ForwardOnly has no decode capability (init_cache, step)" in report.table()


def test_a_missing_forward_is_an_error():
    report = doctor.diagnose(f"{__name__}:NoForward")
    assert report.findings["forward"].verdict == "missing" and report.exit_status() == 1
    assert {f.verdict for c, f in report.findings.items() if c != "forward"} == {"missing"}
    assert "forward is missing: nothing can be checked" in report.table()


class NoForwardButParameters(NoForward):
    def parameters(self):
        return {}


def test_without_forward_the_capabilities_present_are_not_called_missing():
    """(A fresh init-adapter skeleton has no forward: the table still says which capabilities it has.)"""
    report = doctor.diagnose(f"{__name__}:NoForwardButParameters")
    verdicts = {c: f.verdict for c, f in report.findings.items() if c != "forward"}
    assert verdicts.pop("parameters") == "unchecked" and set(verdicts.values()) == {"missing"}, report.table()
