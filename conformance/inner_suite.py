"""The conftest of the small pytest runs that the report and gate tests launch with pytester: the parity plugin
and just the options it reads, so the inner runs need neither JAX nor the references."""

INNER_CONFTEST = """
pytest_plugins = ["parity.plugin"]


def pytest_addoption(parser):
    # Where the suite is installed as a package, its pytest11 entry point (conformance.plugin) declares these already.
    for name, kwargs in (("--tolerance-profile", dict(default="default")), ("--parity-json", dict(default=None)),
                         ("--parity-report", dict(default=None)), ("--parity-baseline", dict(default=None)),
                         ("--parity-update-baseline", dict(action="store_true", default=False))):
        try:
            parser.addoption(name, **kwargs)
        except ValueError:
            pass
"""
