"""Only the named fallback notices are silenced; any other warning or log record still shows."""

from __future__ import annotations

import logging
import warnings

from recipes.fallback_notices import quiet_fallbacks


def test_fallback_warnings_are_silenced_and_others_are_not(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_fallbacks()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("checkpoint format is old: converting")
    assert [str(w.message) for w in caught] == ["checkpoint format is old: converting"]

    logger = logging.getLogger("megatron.core.rerun_state_machine")
    with caplog.at_level(logging.INFO):
        logger.warning("Implicit initialization of Rerun State Machine!")
        logger.warning("rerun requested: loss is NaN")
    assert [r.getMessage() for r in caplog.records] == ["rerun requested: loss is NaN"]
