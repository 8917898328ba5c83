"""What a person sees while cai runs.

At the default verbosity: one line when a step starts, one progress bar per long phase
(generation, judging, training steps: cai's own bars, with rate and ETA), one summary
line when it ends, the warnings that are the user's (each shown once), and none of the
libraries' bars for loading or saving a model or mapping a dataset. `-q` drops the
progress bars and the start lines; `-v` shows everything the libraries say, `NOISE`
included, and debug logging.

`NOISE` is the one list of third-party warnings cai hides at the default verbosity:
each is a library talking about its own code or a state cai has already handled, with
the reason it is not the user's to act on. A warning that is the user's never goes here.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

QUIET, DEFAULT, VERBOSE = -1, 0, 1
verbosity = DEFAULT


@dataclass(frozen=True)
class Noise:
    """A third-party warning hidden at the default verbosity: a Python warning of
    `category`, or a record of the logger `logger`, whose message matches `pattern`."""

    pattern: str
    reason: str
    category: type[Warning] | None = None
    logger: str | None = None


NOISE: tuple[Noise, ...] = (
    Noise(r"`is_gradient_checkpointing` is deprecated",
          "TRL's and peft's own reads of a property transformers 5 renamed (cai never reads it); no setting of "
          "the user's changes it, the libraries' next releases do",
          category=FutureWarning),
    Noise(r"There were missing keys in the checkpoint model loaded: \['lm_head\.weight'\]\.$",
          "tied weights: the output layer shares the input embeddings' tensor, so a checkpoint stores it once; "
          "transformers ties it again after loading, and the resumed run trains the same weights",
          logger="transformers.trainer"),
)


class _HideNoise(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


# The libraries' documented switches for their bars (read when they are imported):
# huggingface_hub's also turns off transformers' ("Loading weights", "Writing model shards").
QUIET_LIBRARY_BARS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


# Where output goes to a file or a pipe (a log, CI), a bar is drawn only for a phase longer
# than LOG_DELAY seconds, and redrawn at most every LOG_INTERVAL seconds: each redraw is a
# line there, not an update in place.
LOG_DELAY, LOG_INTERVAL = 30.0, 60.0


def terminal() -> bool:
    """Whether bars (drawn on stderr) are seen in a terminal."""
    import sys

    return sys.stderr.isatty()


def setup(level: int = DEFAULT) -> None:
    """Set the console for a command: `QUIET`, `DEFAULT` or `VERBOSE`."""
    import sys

    global verbosity
    verbosity = level
    # tqdm's own switches, for the libraries' bars (cai's read `verbosity`): its TQDM_* defaults
    # are read when it is imported, so a process that has imported it (a test's) is left as it is
    if level == QUIET and "tqdm" not in sys.modules:
        os.environ["TQDM_DISABLE"] = "1"
    elif not terminal() and "tqdm" not in sys.modules:  # the libraries' bars in a log, as cai's
        os.environ.setdefault("TQDM_DELAY", str(LOG_DELAY))
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL))
    if level != VERBOSE:
        # loading and saving a model, mapping a dataset: seconds, not a phase to watch
        for name, value in QUIET_LIBRARY_BARS.items():
            os.environ.setdefault(name, value)
        if "transformers" in sys.modules:  # imported already (a test's process): the same switches, called
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        if "datasets" in sys.modules:
            import datasets

            datasets.disable_progress_bars()
        hide_noise()
        for category in (UserWarning, FutureWarning):  # the user's warnings: each message once, not once per call
            warnings.filterwarnings("once", category=category)
        for noise in NOISE:
            if noise.category is not None:
                warnings.filterwarnings("ignore", message=noise.pattern, category=noise.category)


def hide_noise() -> None:
    """The log records of `NOISE` dropped at their loggers."""
    by_logger: dict[str, list[re.Pattern]] = {}
    for noise in NOISE:
        if noise.logger is not None:
            by_logger.setdefault(noise.logger, []).append(re.compile(noise.pattern))
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideNoise) for f in logger.filters):
            logger.addFilter(_HideNoise(patterns))


def bar(iterable=None, **options):
    """cai's progress bar for a long phase (generation, judging, training steps): tqdm's,
    with its rate and ETA, gone from the screen when the phase ends (the step's summary
    line says how long it took); none with -q; in a log, only for a long phase
    (`LOG_DELAY`)."""
    from tqdm.auto import tqdm

    options.setdefault("leave", False)
    options["disable"] = options.get("disable", False) or verbosity == QUIET
    if not terminal():
        options.setdefault("delay", LOG_DELAY)
        options.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **options)


def info(text: str) -> None:
    """A line a person may skip: not printed with -q."""
    if verbosity > QUIET:
        print(text)
