"""A hypothesis profile for measuring keras-hub with the whole suite: `pytest -p adapters.keras_hub.measure_profile
--hypothesis-profile keras-hub-measure ...`.

The suite's `ci` profile (derandomized, no database) without the shrink phase: a failing drawn case is reported as
drawn, not shrunk. Shrinking rebuilds a keras-hub model (seconds of Keras construction and XLA compilation) per
step, up to hypothesis' five-minute shrink limit per failing property, which made one whole-suite run take hours.
"""
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("keras-hub-measure", settings(settings.get_profile("default"), deadline=None,
                                                           suppress_health_check=[HealthCheck.too_slow],
                                                           derandomize=True, database=None, print_blob=True,
                                                           max_examples=100,
                                                           phases=[Phase.explicit, Phase.reuse, Phase.generate]))
