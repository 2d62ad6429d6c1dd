"""`quiet_hf_libraries(logs=False)`: the bars-only mode eval, preview, generate and the demo run under."""

from __future__ import annotations

import logging

import pytest

from csaligner.encoders.hf_quiet import quiet_hf_libraries


def test_bars_only_keeps_the_libraries_warnings() -> None:
    pytest.importorskip("transformers")
    diffusers_logging = pytest.importorskip("diffusers.utils.logging")
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with quiet_hf_libraries(logs=False):
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert not diffusers_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == level  # a warning such as "weights newly initialized" still shows
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert diffusers_logging.is_progress_bar_enabled()
    with quiet_hf_libraries():  # encode --quiet: warnings too
        assert hf_logging.get_verbosity() == logging.ERROR
    assert hf_logging.get_verbosity() == level
