"""In-repo pytest: the suite's plugin (conformance/plugin.py: options, device simulation, hypothesis profiles, shared
fixtures, and through it parity.plugin). An installed copy of the suite registers the same module through its
`pytest11` entry point under this very name, so pytest then finds it registered and loads it once."""

pytest_plugins = ["conformance.plugin"]
