"""The suite's pytest plugin: suite-wide CLI options, CPU device simulation, hypothesis profiles and shared fixtures.

Every command-line option of the suite is declared here, so `pytest --help` is the one place to read them. Loaded by
the repository's root conftest.py (`pytest_plugins`) and, when the suite is installed as a package, by the `pytest11`
entry point named `conformance.plugin` (pyproject.toml): pytest registers both under that one name, so a run inside
the repository with the package installed loads it once. It brings parity.plugin (records, JSON, HTML, baseline).
"""
from __future__ import annotations

import ast
import gc
import os
import re
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression  # pytest's own -m parser (pinned pytest)
from hypothesis import HealthCheck, Phase, settings

from adapters import protocol
from adapters.protocol import BUILTIN, AdapterError, load
from conformance import components, model_scope, mutants, real_slice, support
from fixtures.real_model import RealModelError
from llama_spec.checkpoint import CheckpointError, load_checkpoint
from llama_spec.layout import check_splittable, make_mesh, parse_mesh
from parity.plugin import note_scope, note_seed
from tp_llama import distributed
from tp_llama.compile_cache import enable_compilation_cache

DEFAULT_MESHES = ("1x1", "1x4")
# --model -> its default meshes: the real model's 9 heads, 3 kv heads and 49152-token vocabulary split at 3, not 4
MODEL_MESHES = {"tiny": DEFAULT_MESHES, "smollm2-135m": ("1x1", "1x3")}
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_REFERENCES = ("meta", "hf")
SIMULATED_CPU_DEVICES = 8

pytest_plugins = ["parity.plugin", "parity.compiles"]

# Hypothesis profiles, registered at import so that hypothesis's own `--hypothesis-profile NAME` (applied in its
# pytest_configure, after this file is imported) can pick one. Without it: `ci` under CI=true, else `dev`.
# Each derives from hypothesis's "default" profile, not the active one (hypothesis itself activates its own
# "ci" whenever $CI is set). Model-level properties run a share of max_examples (strategies.model_settings);
# under `dev` they take their models and shapes from a small fixed set and draw only the values, so runs reuse
# compilations (strategies.FIXED_SHAPE_PROFILES); `ci` (derandomized) and `thorough` draw every shape.
_HYPOTHESIS_BASE = settings(settings.get_profile("default"), deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", _HYPOTHESIS_BASE, derandomize=True, database=None, print_blob=True, max_examples=100)
settings.register_profile("dev", _HYPOTHESIS_BASE, max_examples=100)
settings.register_profile("thorough", _HYPOTHESIS_BASE, max_examples=1000)
# `ci` without the shrink phase, for measuring an implementation that is slow to build (keras-hub: seconds of Keras
# construction and XLA compilation per model): a failing draw is reported as drawn. Shrinking rebuilds the model per
# step, up to hypothesis' five-minute shrink limit per failing property, which made one whole-suite run take hours.
settings.register_profile("measure", _HYPOTHESIS_BASE, derandomize=True, database=None, print_blob=True,
                          max_examples=100, phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("true", "1") else "dev")


def pytest_addoption(parser):
    group = parser.getgroup("tp_llama", "tensor-parallel Llama 3.1 conformance")
    group.addoption("--mesh", action="append", default=None, metavar="DxM",
                    help=f"mesh data x model, repeatable (default: {' '.join(DEFAULT_MESHES)})")
    group.addoption("--model", default="tiny", choices=tuple(MODEL_MESHES),
                    help="the battery's model: the synthetic tiny preset, or the real SmolLM2-135M-Instruct "
                         "(fixtures/real_model.py; default meshes 1x1 1x3); every check runs on it or says "
                         "'not checked' and why (default: %(default)s)")
    group.addoption("--dtype", action="append", default=None, choices=DEFAULT_DTYPES,
                    help=f"activation/weight dtype, repeatable (default: {' '.join(DEFAULT_DTYPES)})")
    group.addoption("--reference", action="append", default=None, choices=("meta", "hf", "oracle"),
                    help=f"reference implementation, repeatable (default: {' '.join(DEFAULT_REFERENCES)})")
    group.addoption("--cpu-devices", type=int, default=SIMULATED_CPU_DEVICES, metavar="N",
                    help="simulated CPU devices when JAX runs on the CPU (default: %(default)s); "
                         "ignored when JAX_PLATFORMS selects an accelerator")
    group.addoption("--mutant", default=None, metavar="NAME",
                    help="plant one bug from conformance/mutants.py into the model for this run "
                         "(python -m conformance.kill_matrix runs them all)")
    group.addoption("--tolerance-profile", default="default", choices=("strict", "default"),
                    help="column of parity/tolerances.py to hold results to (default: %(default)s)")
    group.addoption("--parity-json", default=None, metavar="PATH",
                    help="write every parity record (metrics, bounds, verdict) and the environment as JSON")
    group.addoption("--parity-report", default=None, metavar="PATH",
                    help="write the self-contained HTML parity report (matrix, depth chart, records, environment)")
    group.addoption("--parity-baseline", default=None, metavar="PATH",
                    help="fail the run when a case that passed in this baseline fails, or a metric worsens past "
                         "the slack of parity/tolerances.py (committed: fixtures/parity_baseline.json)")
    group.addoption("--parity-update-baseline", action="store_true", default=False,
                    help="rewrite the --parity-baseline file from this run instead of judging against it")
    group.addoption("--checkpoint-dir", default=None, metavar="DIR",
                    help="a real checkpoint (Meta params.json + consolidated.NN.pth, or HF config.json + "
                         "*.safetensors, with its tokenizer files): the real slice (test_real_model.py) runs on it "
                         "through --impl instead of the pinned SmolLM2, and the layer-by-layer checkpoint test "
                         "reads it")
    group.addoption("--impl", default=None, metavar="MODULE:ATTR",
                    help="the JAX Llama implementation under test: every check runs on it through the adapter "
                         "protocol of adapters/protocol.py, or says 'not checked' and why "
                         "(default: the built-in tp_llama.adapter:TPLlamaAdapter)")
    group.addoption("--distributed", action="store_true", default=False,
                    help="join a JAX multi-controller run, one pytest per process (jax.distributed.initialize); "
                         "what the three options below leave out JAX detects (TPU pod, SLURM, Open MPI)")
    group.addoption("--coordinator-address", default=None, metavar="HOST:PORT",
                    help="process 0's coordinator for a multi-process run (env JAX_COORDINATOR_ADDRESS)")
    group.addoption("--num-processes", type=int, default=None, metavar="N",
                    help="processes in a multi-process run (env JAX_NUM_PROCESSES)")
    group.addoption("--process-id", type=int, default=None, metavar="I",
                    help="this process's index 0..N-1 in a multi-process run (env JAX_PROCESS_ID); process 0 "
                         "writes the parity files")


def _simulate_cpu_devices(count: int) -> bool:
    """Must run before any JAX backend starts; a real accelerator platform is left alone. Says whether it simulated
    (then this process has exactly `count` devices)."""
    platforms = os.environ.get("JAX_PLATFORMS", "cpu")
    if platforms.split(",")[0] not in ("", "cpu"):
        return False
    import jax

    jax.config.update("jax_num_cpu_devices", count)
    return True


def _join_multiprocess_run(config) -> bool:
    """One pytest per process, joined by jax.distributed before any backend starts. Every mesh must span the
    devices of all processes (each takes part in every computation and gather), and only process 0 writes the
    parity files, so records are written once. Says whether it joined."""
    try:
        chosen = distributed.settings(config.getoption("coordinator_address"), config.getoption("num_processes"),
                                      config.getoption("process_id"), auto=config.getoption("distributed"))
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None
    if chosen is None:
        return False
    if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        raise pytest.UsageError("a multi-process run is one pytest per process: drop -n (pytest-xdist)")
    distributed.initialize(chosen)
    import jax

    devices = jax.device_count()
    meshes = config.getoption("mesh") or [f"1x{devices}"]
    for mesh in meshes:
        try:
            d, m = parse_mesh(mesh)
        except ValueError as err:
            raise pytest.UsageError(f"--mesh: {err}") from None
        if d * m != devices:
            raise pytest.UsageError(f"--mesh {mesh}: a multi-process run needs meshes over all {devices} devices of "
                                    f"its {jax.process_count()} processes, for example --mesh 1x{devices}")
    config.option.mesh = meshes
    if jax.process_index() != 0:
        config.option.parity_json = config.option.parity_report = config.option.parity_baseline = None
        config.option.parity_update_baseline = False
    return True


def _check_option_conflicts(option) -> None:
    """Options that contradict each other stop the run with one line before collection, not after a whole run."""
    if option.cpu_devices < 1:
        raise pytest.UsageError(f"--cpu-devices {option.cpu_devices}: must be at least 1")
    if option.mutant and option.parity_update_baseline:
        raise pytest.UsageError(f"--mutant {option.mutant} with --parity-update-baseline would record a planted bug "
                                "as the baseline: drop one of them")
    paths = {}
    for name in ("parity_json", "parity_report", "parity_baseline"):
        path = getattr(option, name)
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        resolved = os.path.realpath(path)
        if resolved in paths:
            raise pytest.UsageError(f"{paths[resolved]} and {flag} both name {path}: one file would overwrite the "
                                    "other; give each its own path")
        paths[resolved] = flag


def _check_meshes(meshes, devices: int | None, configs: dict) -> None:
    """A mesh the devices cannot hold, or whose model axis cannot split a config the tests build, would fail every
    test on it, blamed on the implementation: refuse it with one line before collection. `devices`: how many this
    run has (None: not known before JAX starts, on an accelerator); `configs`: where each config comes from ->
    the LlamaConfig."""
    for mesh in meshes:
        if not re.fullmatch(r"\d+x\d+", mesh):
            raise pytest.UsageError(f"--mesh {mesh!r}: expected DxM, for example 1x4 (data x model)")
        try:
            data, model = parse_mesh(mesh)
        except ValueError as err:
            raise pytest.UsageError(f"--mesh: {err}") from None
        if devices is not None and data * model > devices:
            raise pytest.UsageError(f"--mesh {mesh} needs {data * model} devices but this run simulates {devices} CPU "
                                    f"devices: give --cpu-devices {data * model} or a smaller mesh")
        for source, config in configs.items():
            try:
                check_splittable(config, model, where=f"--mesh {mesh}: {source}")
            except ValueError as err:
                raise pytest.UsageError(str(err)) from None


# The repository's pytest.ini declares these too; an installed suite run from another directory (`llama-conformance`)
# has no such file, so the plugin registers whatever the ini did not.
MARKERS = {
    "slow": "large shapes (8B widths); run with -m slow",
    "multihost": "launches several JAX processes over loopback",
    "e2e": "runs the suite or one of its commands in child processes (the gate, the report, the CLIs end to end); "
           "run with -m e2e",
    "browser": "opens the HTML report in headless Chromium",
    "real_full": "the real-model slice beyond the default run (every prompt, mesh 2x3); run with -m real_full",
    "ecosystem": "public implementations (keras-hub) in their own environment, requirements-ecosystem.txt",
}
FILTERWARNINGS = ("ignore::DeprecationWarning:fairscale.*",)


def _register_ini_defaults(config) -> None:
    declared = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {text}")
    present = set(config.getini("filterwarnings"))
    for line in FILTERWARNINGS:
        if line not in present:
            config.addinivalue_line("filterwarnings", line)


def _distribute_by_module(config) -> None:
    """Under `-n N` without a --dist of the user's, send each test module to one worker (xdist's loadfile) instead of
    test by test: a module's references, checkpoints and decoding runs are computed once, not once per worker.

    The modules go out in collection order, not requeued by test count (xdist's loadscope-reorder): by count, the
    costly modules with few tests came last and modules that run the same programs and references ended up on
    different workers. The measured effect of both: docs/results.md#scheduling-and-garbage-collection."""
    if getattr(config.option, "dist", "no") != "load":
        return
    given = list(config.invocation_params.args) + os.environ.get("PYTEST_ADDOPTS", "").split()
    if not any(arg == "-d" or arg.startswith("--dist") for arg in given):  # --dist MODE, --dist=MODE, --distload
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_cores_among_workers(config) -> None:
    """Under `-n N`, give each worker's OpenMP and BLAS pools (torch's references, numpy's float64 oracle) the
    worker's share of the cores, unless the user set OMP_NUM_THREADS. Set in the controller before xdist starts the
    workers, so they inherit it before importing torch or numpy. Pools as wide as the machine got in each other's
    way (most likely threads spinning while they wait); timings: docs/results.md#scheduling-and-garbage-collection."""
    workers = getattr(config.option, "numprocesses", None)
    if hasattr(config, "workerinput") or not isinstance(workers, int) or workers < 1 or "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, _usable_cores() // workers))


@pytest.hookimpl(tryfirst=True)  # before parity.plugin reads the file options, which _join_multiprocess_run sets
def pytest_configure(config):
    _register_ini_defaults(config)
    _check_option_conflicts(config.option)
    _distribute_by_module(config)
    _share_cores_among_workers(config)

    simulated = _simulate_cpu_devices(config.getoption("cpu_devices"))
    enable_compilation_cache()  # $TP_LLAMA_COMPILATION_CACHE: the directory, or 'off'
    joined = _join_multiprocess_run(config)  # checks its meshes against all processes' devices itself
    mutant = config.getoption("mutant")
    if mutant:
        try:
            config.add_cleanup(mutants.apply(mutant))
        except ValueError as err:
            raise pytest.UsageError(f"--mutant: {err}") from None
    model = config.getoption("model")
    try:  # before collection: the test modules' parameters are the chosen model's
        model_scope.use(model)
    except RealModelError as err:
        raise pytest.UsageError(f"--model {model}: {err}") from None
    configs = {f"--model {model}" if model != "tiny" else
               "the suite's tiny config (llama_spec.config.PRESETS['tiny'])": support.CONFIG}
    if config.getoption("checkpoint_dir"):
        try:  # metadata only: a bad checkpoint stops the run with one line, before any test
            checkpoint, weights = load_checkpoint(config.getoption("checkpoint_dir"))
            real_slice.use_checkpoint(config.getoption("checkpoint_dir"))  # the real slice runs on it
        except CheckpointError as err:
            raise pytest.UsageError(f"--checkpoint-dir: {err}") from None
        if config.getoption("mesh"):  # named meshes must split it; on default ones, what cannot is not checked
            configs[str(weights.config_path)] = checkpoint
    note_scope(config, battery=battery_modules(),
               battery_deselected=deselected_by_marks(config.getoption("markexpr", default="") or ""),
               meshes=_chosen(config, "mesh", MODEL_MESHES[model]),
               dtypes=_chosen(config, "dtype", DEFAULT_DTYPES), references=_chosen(config, "reference",
                                                                                   DEFAULT_REFERENCES))
    devices = config.getoption("cpu_devices") if simulated and not joined else None
    _check_meshes(config.getoption("mesh") or MODEL_MESHES[model], devices, configs)
    if config.getoption("impl"):
        try:  # a typo in --impl stops the run with one line, before any test
            factory = load(config.getoption("impl"))
        except AdapterError as err:
            raise pytest.UsageError(str(err)) from None
        if mutant and factory is not load(BUILTIN):
            raise pytest.UsageError(f"--mutant {mutant} plants its bug in the built-in tp_llama model, which --impl "
                                    f"{config.getoption('impl')} does not run: drop one of them")


def pytest_collection_modifyitems(config, items):
    """Under a --model other than tiny, what cannot run on it is skipped as not checked (conformance/model_scope)."""
    model_scope.mark_not_checked(items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """What imports and collection made (about a million objects: torch, transformers, JAX, the test modules) lives
    until the process ends, so take it out of the garbage collector's reach (gc.freeze): every full collection
    walked all of it. Its measured effect: docs/results.md#scheduling-and-garbage-collection."""
    gc.freeze()


def _chosen(config, name, default):
    return list(dict.fromkeys(config.getoption(name) or default))


def battery_modules() -> list[str]:
    """The battery's test modules, 'conformance/test_*.py': what a run's modules are compared against."""
    here = Path(__file__).parent
    return sorted(f"{here.name}/{path.name}" for path in here.glob("test_*.py"))


def module_marks(path: Path) -> list[str]:
    """The marks a test module's `pytestmark` gives all its tests, read from its source: importing it would import
    libraries (keras, torchax, easydel) this environment may not have."""
    marks: list[str] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            for part in ast.walk(node.value):
                if (isinstance(part, ast.Attribute) and isinstance(part.value, ast.Attribute)
                        and part.value.attr == "mark" and part.attr not in ("usefixtures", "parametrize")):
                    marks.append(part.attr)
    return marks


def deselected_by_marks(markexpr: str) -> dict[str, list[str]]:
    """Battery module -> its module marks, for the modules whose marks alone put them outside `-m markexpr`
    (the default selection leaves out `slow` and `ecosystem`): the report tells them from modules a run left out."""
    if not markexpr:
        return {}
    try:
        expression = Expression.compile(markexpr)
    except SyntaxError:  # pytest itself reports a bad -m expression
        return {}
    root = Path(__file__).parent.parent
    out = {}
    for module in battery_modules():
        marks = module_marks(root / module)
        if marks and not expression.evaluate(lambda name, **_: name in marks):
            out[module] = marks
    return out


def pytest_generate_tests(metafunc):
    """Fixtures named `mesh`, `dtype` and `reference` are parametrized from the options, in that id order."""
    config = metafunc.config
    meshes = MODEL_MESHES[config.getoption("model")]
    for name, default in (("reference", DEFAULT_REFERENCES), ("dtype", DEFAULT_DTYPES), ("mesh", meshes)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, _chosen(config, name, default), scope="session")


# ---- shared fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_config():
    """The battery's model's config (named for the default, the tiny preset; --model chooses another)."""
    return support.CONFIG


WEIGHT_SEED = 0


@pytest.fixture(scope="session")
def tiny_weights(request, tiny_config):
    """The canonical Meta-layout weight set every conformance test shares (its seed goes into the report); under
    --model, the real model's weights."""
    if support.MODEL != "tiny":
        return support.canonical()
    note_seed(request.config, "weights", WEIGHT_SEED)
    return support.canonical()


@pytest.fixture
def judge(request, impl, reference, dtype, mesh):
    """The test's subject and scope in one (conformance.components.Judge): `judge.check(components.RMSNORM, ...)`."""
    return components.Judge(request, impl, reference, dtype, mesh)


@pytest.fixture(scope="session")
def builtin_only(request):
    """For tests of the built-in model's own code (its internals, CLI, benchmarks, planted bugs): under another
    --impl they are not checked, never run on the built-in model in the other's place."""
    spec = request.config.getoption("impl")
    if spec and protocol.load(spec) is not protocol.load(protocol.BUILTIN):
        pytest.skip(f"not checked: tests the built-in tp_llama model's own code, not --impl {spec}")


@pytest.fixture(scope="session")
def tp_model(builtin_only, impl):
    """tp_model(mesh, dtype) -> (TPLlama, placed params) of the built-in model, the very objects `impl` built."""
    def get(mesh: str, dtype: str):
        adapter = impl(mesh, dtype)
        return adapter.model, adapter.params

    return get


# The largest batch and longest sequence (positions included) any check asks of the implementation; passed to
# build() so implementations that size caches or RoPE tables up front can.
MAX_BATCH_SIZE = 4
MAX_SEQ_LEN = 16384


@pytest.fixture(scope="session")
def impl_factory(request):
    """The --impl factory (default: the built-in tp_llama), for checks that build it for their own configs."""
    return protocol.load(request.config.getoption("impl") or protocol.BUILTIN)


@pytest.fixture(scope="session")
def impl(impl_factory, tiny_config, tiny_weights):
    """impl(mesh, dtype) -> the --impl implementation built through the adapter protocol for the tiny config on
    that mesh, once per session; a build that raised raises again."""
    factory = impl_factory
    built = {}

    def get(mesh: str, dtype: str):
        unsplittable = support.MODEL != "tiny" and support.unsplittable(mesh)
        if unsplittable:  # a test's own fixed mesh (the option's meshes were checked before collection)
            pytest.skip(f"not checked on {support.MODEL}: {unsplittable}")
        if (mesh, dtype) not in built:
            try:
                built[mesh, dtype] = protocol.build(factory, tiny_config, tiny_weights, make_mesh(mesh), dtype,
                                                    max_batch_size=MAX_BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)
            except Exception as err:  # noqa: BLE001 - kept and raised to every test that asks for this build
                built[mesh, dtype] = err
        if isinstance(built[mesh, dtype], Exception):
            raise built[mesh, dtype]
        return built[mesh, dtype]

    return get


@pytest.fixture(scope="session")
def model_weights(request):
    """(config, Meta-layout weights): the --checkpoint-dir checkpoint (tensors read from disk on access), or the
    synthetic tiny preset and its canonical weights."""
    directory = request.config.getoption("checkpoint_dir")
    if directory:
        return load_checkpoint(directory)
    return request.getfixturevalue("tiny_config"), request.getfixturevalue("tiny_weights")
