"""The conftest of the small pytest runs that the report and gate tests launch with pytester: the parity plugin
and just the options it reads, so the inner runs need neither JAX nor the references."""

INNER_CONFTEST = """
pytest_plugins = ["parity.plugin"]


def pytest_addoption(parser):
    parser.addoption("--tolerance-profile", default="default")
    parser.addoption("--parity-json", default=None)
    parser.addoption("--parity-report", default=None)
    parser.addoption("--parity-baseline", default=None)
    parser.addoption("--parity-update-baseline", action="store_true", default=False)
"""
