"""Converting before the Linear-detection helper answers, and finishing only once its answer agrees.

Why: the helper (linears_helper.py) imports transformers and builds the model on the meta device:
it answered 7-11 s after start on the H200 machine with everything cached and 16-26 s cold, while
the command itself was ready to convert after 2.4-6.3 s (README Performance). For the models users convert, the plan's name
rules decide the same output as the model does. So a run into an empty DST plans with the name rules
and starts converting at once. A thread waits for the helper's answer, plans again with it, and
compares what decides the output: the journal fingerprint (every output tensor's name, dtype and
shape in every shard, the scales, the format), the config files, the report and the excluded
modules. Where the helper gives no answer (it died, or read other headers), the model is built in
this process by :meth:`Speculation.confirm`, on the main thread after the pipeline: transformers
changes process-wide state while it builds one (the default dtype among it).

The run writes its config files and index only after the two plans matched. Where they differ, the
run is stopped, everything it wrote is removed and it converts again with the model's plan
(:class:`Mismatch`). Where the helper refuses the checkpoint (a tensor of its model in no shard), the
run stops with that error and removes what it wrote, as if it had been refused before starting. A
run that fails or is interrupted before its plan was confirmed keeps nothing either (conversion.py):
a resume plans with the model, and its plan could differ.
"""

from __future__ import annotations

import threading
from typing import Callable

from . import journal, linears, profile, uncalibrated


class Mismatch(Exception):
    """The model's plan differs from the name rules' plan: convert again with :attr:`plan`."""

    def __init__(self, plan, what: str):
        super().__init__(f"the model's plan differs from the name rules' plan ({what})")
        self.plan, self.what = plan, what


def difference(a, b, fmt, extra: dict | None) -> str | None:
    """What differs between the outputs of plans ``a`` and ``b``, or None: the same bytes and files."""
    if journal.fingerprint(a, extra) != journal.fingerprint(b, extra):
        return "output tensors"
    if fmt.config_files(a, a.source.config) != fmt.config_files(b, b.source.config):
        return "config files"
    if uncalibrated.report(a) != uncalibrated.report(b):
        return "report"
    if sorted(a.excluded) != sorted(b.excluded):
        return "excluded modules"
    return None


class Speculation:
    """Waits, in a thread, for the plan made with the helper's answer (``replan``) and compares it with
    ``plan``, the one being converted."""

    def __init__(self, plan, replan: Callable[..., object], fmt, extra: dict | None = None):
        """``replan(build_model)``: the plan with the model's answer; ``build_model=False``: the helper's
        answer only, else linears.NoAnswer."""
        self.plan, self._replan, self._fmt, self._extra = plan, replan, fmt, extra
        self.confirmed = None  # the model's plan, once it matched
        self.error: BaseException | None = None  # Mismatch, or the helper's refusal
        self._deferred = False  # no helper answer: confirm() builds the model on the calling thread
        self._thread = threading.Thread(target=self._wait, name="shardconv-speculation", daemon=True)
        self._thread.start()

    def _judge(self, build_model: bool) -> None:
        try:
            real = self._replan(build_model)
            what = difference(self.plan, real, self._fmt, self._extra)
            if what is not None:
                raise Mismatch(real, what)
            self.confirmed = real
            profile.say(f"plan confirmed by the Linear layers' model {profile.process_age():.1f} s after process start")
        except linears.NoAnswer:
            self._deferred = True
        except BaseException as e:
            self.error = e

    def _wait(self) -> None:
        self._judge(build_model=False)

    @property
    def refuted(self) -> bool:
        """The helper's answer refused the checkpoint or another plan: nothing this run wrote stands."""
        return self.error is not None

    def check(self) -> None:
        """Raise the helper's verdict now if it refuted the plan (the pipeline asks between groups)."""
        if self.error is not None:
            raise self.error

    def confirm(self):
        """Wait for the verdict: the model's plan if it matched; raises Mismatch or the refusal."""
        self._thread.join()
        if self._deferred and self.confirmed is None and self.error is None:
            self._judge(build_model=True)
        self.check()
        return self.confirmed
