"""Suite-wide CLI options, CPU device simulation and shared fixtures.

Every command-line option of the suite is declared here, so `pytest --help` is the one place to read them.
"""
from __future__ import annotations

import os
import re

import pytest

DEFAULT_MESHES = ("1x1", "1x4")
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_REFERENCES = ("meta", "hf")
SIMULATED_CPU_DEVICES = 8

pytest_plugins = ["parity.plugin"]


def pytest_addoption(parser):
    group = parser.getgroup("tp_llama", "tensor-parallel Llama 3.1 conformance")
    group.addoption("--mesh", action="append", default=None, metavar="DxM",
                    help=f"mesh data x model, repeatable (default: {' '.join(DEFAULT_MESHES)})")
    group.addoption("--dtype", action="append", default=None, choices=DEFAULT_DTYPES,
                    help=f"activation/weight dtype, repeatable (default: {' '.join(DEFAULT_DTYPES)})")
    group.addoption("--reference", action="append", default=None, choices=("meta", "hf", "oracle"),
                    help=f"reference implementation, repeatable (default: {' '.join(DEFAULT_REFERENCES)})")
    group.addoption("--cpu-devices", type=int, default=SIMULATED_CPU_DEVICES, metavar="N",
                    help="simulated CPU devices when JAX runs on the CPU (default: %(default)s); "
                         "ignored when JAX_PLATFORMS selects an accelerator")
    group.addoption("--mutant", default=None, metavar="NAME",
                    help="plant one bug from conformance/mutants.py into the model for this run "
                         "(python -m conformance.mutants runs them all)")
    group.addoption("--tolerance-profile", default="default", choices=("strict", "default"),
                    help="column of fixtures/tolerances.py to hold results to (default: %(default)s)")
    group.addoption("--parity-json", default=None, metavar="PATH",
                    help="write every parity record (metrics, bounds, verdict) and the environment as JSON")
    group.addoption("--parity-report", default=None, metavar="PATH",
                    help="write the self-contained HTML parity report (matrix, depth chart, records, environment)")
    group.addoption("--parity-baseline", default=None, metavar="PATH",
                    help="fail the run when a case that passed in this baseline fails, or a metric worsens past "
                         "the slack of fixtures/tolerances.py (committed: fixtures/parity_baseline.json)")
    group.addoption("--parity-update-baseline", action="store_true", default=False,
                    help="rewrite the --parity-baseline file from this run instead of judging against it")
    group.addoption("--checkpoint-dir", default=None, metavar="DIR",
                    help="test this checkpoint (Meta params.json + consolidated.NN.pth, or HF config.json + "
                         "*.safetensors; read lazily) instead of the synthetic tiny weights where a test takes "
                         "`model_weights`")


def _simulate_cpu_devices(count: int) -> None:
    """Must run before any JAX backend starts; a real accelerator platform is left alone."""
    platforms = os.environ.get("JAX_PLATFORMS", "cpu")
    if platforms.split(",")[0] not in ("", "cpu"):
        return
    import jax

    jax.config.update("jax_num_cpu_devices", count)


def pytest_configure(config):
    _simulate_cpu_devices(config.getoption("cpu_devices"))
    mutant = config.getoption("mutant")
    if mutant:
        from conformance import mutants

        try:
            config.add_cleanup(mutants.apply(mutant))
        except ValueError as err:
            raise pytest.UsageError(f"--mutant: {err}") from None
    for mesh in config.getoption("mesh") or ():
        if not re.fullmatch(r"\d+x\d+", mesh):
            raise pytest.UsageError(f"--mesh {mesh!r}: expected DxM, for example 1x4 (data x model)")
    if config.getoption("checkpoint_dir"):
        from tp_llama.checkpoint import CheckpointError, load_checkpoint

        try:  # metadata only: a bad checkpoint stops the run with one line, before any test
            load_checkpoint(config.getoption("checkpoint_dir"))
        except CheckpointError as err:
            raise pytest.UsageError(f"--checkpoint-dir: {err}") from None


def _chosen(config, name, default):
    return list(dict.fromkeys(config.getoption(name) or default))


def pytest_generate_tests(metafunc):
    """Fixtures named `mesh`, `dtype` and `reference` are parametrized from the options, in that id order."""
    config = metafunc.config
    for name, default in (("reference", DEFAULT_REFERENCES), ("dtype", DEFAULT_DTYPES), ("mesh", DEFAULT_MESHES)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, _chosen(config, name, default), scope="session")


# ---- shared fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_config():
    from tp_llama.config import preset

    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_weights(tiny_config):
    """The canonical Meta-layout weight set every conformance test shares."""
    from fixtures.weights import canonical_weights

    return canonical_weights("tiny", seed=0)


@pytest.fixture(scope="session")
def tp_model(tiny_config, tiny_weights):
    """tp_model(mesh, dtype) -> (TPLlama, placed params) for the tiny config, built once per session."""
    from reference.convert import meta_to_jax
    from tp_llama.model import TPLlama

    built = {}
    tree = meta_to_jax(tiny_weights)

    def get(mesh: str, dtype: str):
        if (mesh, dtype) not in built:
            model = TPLlama.on_mesh(tiny_config, mesh, dtype)
            built[mesh, dtype] = (model, model.place(tree))
        return built[mesh, dtype]

    return get


@pytest.fixture(scope="session")
def model_weights(request):
    """(config, Meta-layout weights): the --checkpoint-dir checkpoint (tensors read from disk on access), or the
    synthetic tiny preset and its canonical weights."""
    directory = request.config.getoption("checkpoint_dir")
    if directory:
        from tp_llama.checkpoint import load_checkpoint

        return load_checkpoint(directory)
    return request.getfixturevalue("tiny_config"), request.getfixturevalue("tiny_weights")
