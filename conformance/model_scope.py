"""What `--model` leaves out: the checks that cannot run on a model other than the tiny preset, each with why.

Under `--model smollm2-135m` the battery's config, weights and meshes are the real model's (support.use_model).
A test module listed here is built on something else than the battery's model (its own synthetic configs, the 8B
widths, Llama 3's tokenizer, self-tests of the suite's checks on planted adapters of the tiny model): its tests
are not checked, never run on tiny in the real model's place. So is any test whose mesh cannot split the model.
"""
from __future__ import annotations

import re

import pytest

from conformance import components, support

_MESH = re.compile(r"\d+x\d+")


def use(name: str) -> None:
    """Make `name` the battery's model (support.use_model) and drop the component inputs made for another."""
    support.use_model(name)
    components.clear_caches()

# module -> why it is not checked under a model other than tiny
MODULES = {
    "test_8b_width": "checks the 8B widths (llama_spec.config.preset('8b')), not the battery's model",
    "test_published_configs": "checks published configs' shapes, no weights of the battery's model",
    "test_tokenizer": "checks Llama 3's tokenizer; the real model's own tokenizer runs in the real slice",
    "test_stop_tokens": "checks Llama 3's stop ids on a model with Llama 3's vocabulary, which the real one lacks",
    "test_config_crosscheck": "builds its own synthetic configs and weights",
    "test_metamorphic": "draws its own small synthetic configs and weights (conformance/strategies.py)",
    "test_properties": "draws its own small synthetic configs and weights (conformance/strategies.py)",
    "test_references": "validates the references on the tiny preset, where their inline bounds were measured",
    "test_checkpoints": "writes the tiny weights in every checkpoint format; give the real model's converted "
                        "checkpoint (python -m fixtures.real_model prints it) as --checkpoint-dir instead",
    "test_checkpoint_handoff": "writes the tiny weights in every checkpoint format and builds from each",
    "test_multihost": "launches child pytest processes on the tiny model",
    "test_ecosystem": "public implementations' own tiny-model checks in their own environment",
    "test_ecosystem_easydel": "public implementations' own tiny-model checks in their own environment",
    "test_ecosystem_penzai": "public implementations' own tiny-model checks in their own environment",
    "test_ecosystem_torchax": "public implementations' own tiny-model checks in their own environment",
}

# module::test -> why: self-tests of a check on planted adapters of the tiny model (they judge the suite, not the
# subject), and cases built on another vocabulary
TESTS = {
    **{f"test_communication::{name}": "a self-test of the communication check on planted tiny-model adapters"
       for name in ("test_gathering_instead_of_all_reducing_fails_naming_layer_and_op",
                    "test_ignoring_the_mesh_fails_with_no_sums",
                    "test_the_callers_gather_of_the_logits_is_reported_not_failed",
                    "test_a_missing_capability_is_not_checked", "test_logits_stay_sharded_on_vocab")},
    **{f"test_sharding::{name}": "a self-test of the sharding check on planted tiny-model adapters"
       for name in ("test_an_adapter_that_ignores_the_mesh_fails",
                    "test_row_parallel_weights_split_the_wrong_way_fail", "test_a_missing_capability_is_not_checked",
                    "test_unsplittable_model_axis_is_rejected", "test_vocab_not_divisible_is_rejected")},
    **{f"test_impl::{name}": "a self-test of the adapter protocol on planted tiny-model adapters"
       for name in ("test_build_rejects_adapters_that_break_the_protocol",
                    "test_missing_intermediates_are_not_checked_not_passed", "test_unknown_intermediate_names_fail",
                    "test_planted_bug_in_an_adapter_is_caught", "test_a_missing_component_is_not_checked")},
    "test_generation::text": "the 'text' case puts Llama 3's vocabulary on the tiny width; the real model's text "
                             "is the real_chat case",
}


def _module_and_test(item) -> tuple[str, str]:
    module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else ""
    return module, getattr(item, "originalname", item.name)


def not_checked_reason(item) -> str | None:
    """Why `item` does not run on the battery's model (None: it runs)."""
    if support.MODEL == "tiny":
        return None
    module, test = _module_and_test(item)
    if getattr(item, "module", None) and item.module.__name__.startswith("tests."):
        return f"not checked on {support.MODEL}: a self-test of the suite (tests/), run under --model tiny"
    why = MODULES.get(module) or TESTS.get(f"{module}::{test}")
    params = getattr(getattr(item, "callspec", None), "params", {})
    if not why and module == "test_generation" and params.get("case_name") == "text":
        why = TESTS["test_generation::text"]
    if not why and module == "test_logits" and params.get("case") == "small_rows":
        why = f"weight set small_rows scales embedding rows, which {support.MODEL}'s tied output shares"
    for value in params.values():
        if not why and isinstance(value, str) and _MESH.fullmatch(value):
            why = support.unsplittable(value)
    return f"not checked on {support.MODEL}: {why}" if why else None


def mark_not_checked(items) -> None:
    """Skip, with the reason, every collected test that cannot run on the battery's model."""
    for item in items:
        reason = not_checked_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
