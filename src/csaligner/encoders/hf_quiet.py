"""Quiet Hugging Face libraries for one block (`csalign encode --quiet`), importing none of them.

Loading a model draws bars of its own (transformers 5: "Loading weights" for every model, also under
sentence-transformers; diffusers: "Loading pipeline components") that a caller's `progress=False`
cannot reach. `quiet_hf_libraries` switches those bars and the libraries' info/warning logs off for a
block and puts them back on exit; `quiet_hf_libraries(logs=False)` switches only the bars off (what
`eval`, `preview`, `generate` and the demo do by default: they draw no progress of their own, and a
loading bar in the middle of a report is noise, while a library's warning may still matter).

It silences only libraries already imported: importing transformers costs about a second, and an
encoder that never uses it (tiny-text, efficientnet-lite0) should not pay for quiet. A loader that
imports one inside the block calls `silence_imported_hf_libraries` right after the import, before it
loads weights, so its bars are off too; outside a block that call does nothing.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The libraries, each logging under its module name; huggingface_hub first: transformers' bar switch flips
# hub's too, so hub's state is saved before and put back after transformers' (undo runs newest first).
_LIBRARIES = ("huggingface_hub", "transformers", "sentence_transformers", "diffusers")


class _QuietBlock:
    """What one `quiet_hf_libraries` block switched off, and how to switch each back (newest first)."""

    def __init__(self, logs: bool = True) -> None:
        self.logs = logs
        self.silenced: set[str] = set()
        self.undo: list[Callable[[], None]] = []

    def silence_imported(self) -> None:
        """Silence every library imported by now that this block has not silenced yet."""
        for module in _LIBRARIES:
            if module in self.silenced or sys.modules.get(module) is None:  # None: an import blocked on purpose
                continue
            self.silenced.add(module)
            with warnings.catch_warnings():  # a set HF_HUB_DISABLE_PROGRESS_BARS wins over the switches, with a warning
                warnings.simplefilter("ignore")
                self.undo.append(_bars_off(module))
            if not self.logs:
                continue
            logger = logging.getLogger(module)
            level = logger.level  # after _bars_off: transformers sets its own level when first asked
            logger.setLevel(logging.ERROR)
            self.undo.append(functools.partial(logger.setLevel, level))

    def restore(self) -> None:
        """Undo in reverse: transformers' bars back on (which turns hub's on) before hub's own state."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for undo in reversed(self.undo):
                undo()


def _bars_off(module: str) -> Callable[[], None]:
    """Switch `module`'s progress bars off (it is imported); returns what puts them back as they were."""
    if module == "transformers":
        from transformers.utils import logging as hf_logging

        hf_logging.get_verbosity()  # sets up transformers' logger now, so the level saved after is its own
        if not hf_logging.is_progress_bar_enabled():
            return lambda: None
        hf_logging.disable_progress_bar()  # huggingface_hub's bars too; hub's undo (run after) sets them back
        return hf_logging.enable_progress_bar
    if module == "huggingface_hub":
        import huggingface_hub.utils as hub

        was_off = bool(hub.are_progress_bars_disabled())
        hub.disable_progress_bars()

        def restore_hub() -> None:
            if bool(hub.are_progress_bars_disabled()) != was_off:
                (hub.disable_progress_bars if was_off else hub.enable_progress_bars)()

        return restore_hub
    if module == "diffusers":
        from diffusers.utils import logging as diffusers_logging

        if not diffusers_logging.is_progress_bar_enabled():
            return lambda: None
        diffusers_logging.disable_progress_bar()
        return diffusers_logging.enable_progress_bar
    return lambda: None  # sentence-transformers draws its bars through transformers and tqdm: its logger only


_ACTIVE: list[_QuietBlock] = []


@contextmanager
def quiet_hf_libraries(*, logs: bool = True) -> Iterator[None]:
    """Inside the block: no progress bars and (`logs`) no info/warning logs from the Hugging Face libraries.

    transformers', huggingface_hub's and diffusers' bar switches and the libraries' log levels are put
    back as they were on exit (for a library first imported inside the block: as it set them up), so the
    rest of the process is unchanged. Only libraries already imported are touched; loaders silence the
    ones they import with `silence_imported_hf_libraries`.

    Args:
        logs: also raise the libraries' log level to ERROR (`csalign encode --quiet`); False switches only
            their progress bars off and keeps their warnings.
    """
    block = _QuietBlock(logs)
    block.silence_imported()
    _ACTIVE.append(block)
    try:
        yield
    finally:
        _ACTIVE.remove(block)
        block.restore()


def silence_imported_hf_libraries() -> None:
    """Inside a `quiet_hf_libraries` block, silence the libraries imported since it began; else nothing.

    Encoder loaders call it right after importing transformers or sentence-transformers and before
    loading weights, so that a quiet block hides the loading bars of a library it did not import itself.
    """
    for block in _ACTIVE:
        block.silence_imported()
