"""The implementation built from a checkpoint directory by its own loader: `build_from_checkpoint(path, mesh, dtype,
format)` (adapters/protocol.py), in every form a real implementation meets.

The suite writes the canonical tiny weights in float32, once per session, as
- `meta`: params.json + consolidated.00.pth (Meta's layout, interleaved RoPE pairs);
- `meta_mp2`: the same split into two model-parallel shards along fairscale's axes (as Meta ships 70B and 405B);
- `hf_rope_parameters`: config.json in transformers 5's style + safetensors (HF's q/k row permutation);
- `hf_rope_scaling`: the same weights, config.json in the hub's style (top-level `rope_theta`, a `rope_scaling`
  dict), which loaders that know only the other style read as unscaled RoPE;
and checks the logits and every captured intermediate against Meta's and HF's models on the same weights, with
the checks and bounds of the in-memory hand-off (conformance/test_logits.py: check_logits,
check_intermediates). A factory without `build_from_checkpoint` is not checked, with the reason.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import pytest

from adapters import protocol
from conformance import support
from conformance.forward import CASES, check_intermediates, check_logits
from fixtures.checkpoints import write_hf_checkpoint, write_meta_checkpoint
from llama_spec.checkpoint import load_checkpoint
from llama_spec.layout import make_mesh, parse_mesh
from parity.check import record_not_checked
from reference.layers import intermediate_names


@dataclasses.dataclass(frozen=True)
class Form:
    format: str     # what build_from_checkpoint is told: 'meta' or 'hf'
    what: str       # for failure messages
    write: Callable  # (directory, config, weights) -> directory


FORMS = {
    "meta": Form("meta", "Meta (params.json, consolidated.00.pth)", lambda d, c, w: write_meta_checkpoint(
        d, c, w, dtype="float32")),
    "meta_mp2": Form("meta", "Meta, 2 model-parallel shards", lambda d, c, w: write_meta_checkpoint(
        d, c, w, dtype="float32", shards=2)),
    "hf_rope_parameters": Form("hf", "HF (config.json with rope_parameters, safetensors)",
                               lambda d, c, w: write_hf_checkpoint(d, c, w, dtype="float32")),
    "hf_rope_scaling": Form("hf", "HF (hub config.json: rope_theta and rope_scaling, safetensors)",
                            lambda d, c, w: write_hf_checkpoint(d, c, w, dtype="float32", style="hub")),
}
# The hand-off's cases: test_logits' cases on the canonical weights (the checkpoints hold those) from position 0.
HANDOFF_CASES = {name: case for name, case in CASES.items() if case[2] == 0 and case[3] == "canonical"}
MAX_BATCH_SIZE = max(batch for batch, *_ in HANDOFF_CASES.values())
MAX_SEQ_LEN = max(seq for _, seq, *_ in HANDOFF_CASES.values())
CHECKS = {"logits": check_logits, "intermediate": check_intermediates}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tiny_config, tiny_weights) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("handoff")
    return {name: form.write(root / name, tiny_config, tiny_weights) for name, form in FORMS.items()}


def build(factory, directory: Path, form: str, mesh: str, dtype: str):
    return protocol.build_from_checkpoint(factory, directory, make_mesh(mesh), dtype, FORMS[form].format,
                                          max_batch_size=MAX_BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="session")
def from_checkpoint(request, checkpoints):
    """from_checkpoint(form, mesh, dtype) -> the --impl implementation built from that checkpoint by its own loader
    (None: the factory has none), once per session; a build that raised raises again."""
    factory = protocol.load(request.config.getoption("impl") or protocol.BUILTIN)
    built = {}

    def get(form: str, mesh: str, dtype: str):
        key = form, mesh, dtype
        if key not in built:
            try:
                built[key] = build(factory, checkpoints[form], form, mesh, dtype)
            except Exception as err:  # noqa: BLE001 - kept and raised to every test that asks for this build
                built[key] = err
        if isinstance(built[key], Exception):
            raise built[key]
        return built[key]

    return get


def check_handed_off(request, adapter, component: str, form: str, reference: str, dtype: str, mesh: str,
                     case: str) -> None:
    """CHECKS[component] on an adapter built from checkpoint `form`; a failure says which checkpoint."""
    __tracebackhide__ = True
    try:
        CHECKS[component](request, adapter, reference, dtype, mesh, case)
    except AssertionError as err:
        raise AssertionError(f"built from the {FORMS[form].what} checkpoint ({form}), case {case}:\n  {err}") from None


@pytest.mark.parametrize("case", sorted(HANDOFF_CASES))
@pytest.mark.parametrize("component", sorted(CHECKS))
@pytest.mark.parametrize("form", list(FORMS))
def test_built_from_checkpoint(request, from_checkpoint, tiny_config, form, component, case, reference, dtype, mesh):
    if reference == "oracle":
        pytest.skip("the full-model references are meta and hf; the oracle is consulted for noise_ratio")
    batch = CASES[case][0]
    if batch % parse_mesh(mesh)[0]:
        pytest.skip(f"batch {batch} does not split over the data axis of {mesh}")
    adapter = from_checkpoint(form, mesh, dtype)
    if adapter is None:
        factory = protocol.load(request.config.getoption("impl") or protocol.BUILTIN)
        reason = (f"not checked: {protocol.name_of(factory)} has no build_from_checkpoint(path, mesh, dtype, "
                  f"format) to load the {FORMS[form].what} checkpoint")
        names = [f"logits.{case}"] if component == "logits" else [
            n for n in intermediate_names(tiny_config.n_layers) if n != "logits"]
        record_not_checked(request, component=component, names=names, reason=reason, reference=reference,
                           dtype=dtype, mesh=mesh)
        pytest.skip(reason)
    check_handed_off(request, adapter, component, form, reference, dtype, mesh, case)


# ---- the check bites --------------------------------------------------------------------------------------


class _KnowsOneStyle:
    """examples.simple_llama behind a loader that knows only transformers 5's config.json style: the hub's
    `rope_scaling` is silently dropped and RoPE runs unscaled, the bug docs/architecture.md#pitfalls names."""

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype, fmt):
        config, weights = load_checkpoint(path)
        if "rope_parameters" not in json.loads((Path(path) / "config.json").read_text()):
            config = config.replace(rope_scaling=None)
        return protocol.load(support.EXAMPLE).build(config, weights, mesh, dtype)


def test_a_loader_that_drops_the_hub_rope_scaling_fails(request, checkpoints):
    probe = support.probe(request)
    args = ("meta", "float32", "1x1", "batch")
    good = build(_KnowsOneStyle, checkpoints["hf_rope_parameters"], "hf_rope_parameters", "1x1", "float32")
    check_handed_off(probe, good, "logits", "hf_rope_parameters", *args)
    bad = build(_KnowsOneStyle, checkpoints["hf_rope_scaling"], "hf_rope_scaling", "1x1", "float32")
    with pytest.raises(AssertionError, match=r"(?s)hub config.json.*hf_rope_scaling.*component 'logits'"):
        check_handed_off(probe, bad, "logits", "hf_rope_scaling", *args)
    with pytest.raises(AssertionError, match="first failing 'layers.0.q_rope'"):
        check_handed_off(probe, bad, "intermediate", "hf_rope_scaling", *args)
