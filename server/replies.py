"""Every reply checked before anything uses it: the round's ``inspect`` point against broken or hostile sites.

A train reply must hold exactly the records its algorithm declares (:meth:`strategies.base.ClientRule.uploads`),
each with the declared tensor names, and each tensor with the shape and dtype of the tensor of the same name
in the train message it answers (the declared ``reference`` record), all finite. Its ``num-examples``, the
weight n_k of FedAvg's average (McMahan et al. 2017, Eq. 1), must be an integer of at least 1. The server
already knows each site's size from discovery; with ``strategy.example_counts: bounded`` (the default) a
count above it is cut to it, so no site can buy itself the global model by claiming 10¹² examples
(``reported`` trusts the sites). Nor can it name its own ``aggregation-weight``: only a server-side privacy
mechanism sets that (:func:`strategies.base.aggregation_weight`). Evaluate replies get the same count check against the validation size.

A reply that fails is replaced by an error reply (:data:`MALFORMED_CODE`) with a one-line reason: the
strategy never sees it, ``metrics.jsonl`` records the reason, and the round goes on with the others, as for a
site that crashed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from flwr.app import Error, Message, RecordDict

from server.exchange import Exchange
from server.pipeline import Round, RoundPlugin
from strategies.base import AGGREGATION_WEIGHT_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, Cohort, Upload, non_finite

log = logging.getLogger("medfed")

MALFORMED_CODE = 902
"""Error code of a reply the server dropped as malformed."""

SIZE_KEYS = {"train": "n_train", "evaluate": "n_val"}
"""The discovery statistic that bounds a phase's ``num-examples``."""


class ReplyCheck(RoundPlugin):
    """Drops malformed replies and bounds example counts (a round plug-in at ``inspect``).

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id.
    uploads : mapping of str to Upload
        What a train reply holds, from the algorithm's client rule on a model of the task.
    stats : mapping
        Each site's discovery statistics (``n_train``, ``n_val``).
    bounded : bool
        Cut ``num-examples`` to the size learned at discovery (``strategy.example_counts: bounded``).
    pooled : bool
        The one training node trains on every site's data (the centralized baseline): its bound is the sum.
    """

    def __init__(self, cohort: Cohort, uploads: Mapping[str, Upload], stats: Mapping[int, Mapping[str, Any]], *,
                 bounded: bool = True, pooled: bool = False) -> None:
        self.cohort, self.uploads, self.stats, self.bounded, self.pooled = cohort, dict(uploads), stats, bounded, pooled

    def inspect(self, round_: Round, phase: str, done: Exchange, sent: list[Message]) -> None:
        messages = {message.metadata.message_id: message for message in sent}
        for index, reply in enumerate(done.replies):
            if reply.has_error():
                continue
            message = messages[reply.metadata.reply_to_message_id]
            pid = self.cohort.partition_of(reply)
            problem = self.problem(reply.content, message.content, phase, pid)
            if problem is not None:
                log.warning("round %d %s: site %d sent a malformed reply (%s); it is left out", round_.number, phase,
                            pid, problem)
                done.replies[index] = Message(Error(code=MALFORMED_CODE, reason=f"malformed reply: {problem}"),
                                              reply_to=message)

    def problem(self, content: RecordDict, sent: RecordDict, phase: str, pid: int) -> str | None:
        """Why a reply of site ``pid`` to a ``phase`` message holding ``sent`` cannot be used, or ``None``.

        Cuts an example count above the site's known size in place (when bounded).
        """
        problem = self._count_problem(content, phase, pid)
        if problem is None and phase == "train":
            problem = self._upload_problem(content, sent)
        return problem

    def _count_problem(self, content: RecordDict, phase: str, pid: int) -> str | None:
        if METRICS_KEY not in content.metric_records or NUM_EXAMPLES_KEY not in content.metric_records[METRICS_KEY]:
            return f"no '{NUM_EXAMPLES_KEY}' metric"
        metrics = content.metric_records[METRICS_KEY]
        count = metrics[NUM_EXAMPLES_KEY]
        if not isinstance(count, (int, float)) or not math.isfinite(count) or count != int(count) or count < 1:
            return f"'{NUM_EXAMPLES_KEY}' is {count!r}, not a whole number of at least 1"
        if AGGREGATION_WEIGHT_KEY in metrics:
            return f"'{AGGREGATION_WEIGHT_KEY}' is the server's to set (a privacy mechanism's), not a site's"
        known = self._known_size(phase, pid)
        if self.bounded and known is not None and count > known:
            log.warning("site %d reported %s examples for %s, %d at discovery: weighted as %d", pid, count, phase,
                        known, known)
            metrics[NUM_EXAMPLES_KEY] = known
        return None

    def _known_size(self, phase: str, pid: int) -> int | None:
        key = SIZE_KEYS.get(phase)
        if key is None:
            return None
        sizes = [site.get(key) for site in (self.stats.values() if self.pooled and phase == "train"
                                            else [self.stats.get(pid, {})])]
        if any(not isinstance(size, (int, float)) for size in sizes):
            return None  # a task that does not report it
        return int(sum(sizes))  # type: ignore[arg-type]

    def _upload_problem(self, content: RecordDict, sent: RecordDict) -> str | None:
        extra = sorted(set(content.array_records) - set(self.uploads))
        if extra:
            return f"unexpected record '{extra[0]}'"
        for name, upload in self.uploads.items():
            if name not in content.array_records:
                return f"record '{name}' is missing"
            record = content.array_records[name]
            missing = sorted(upload.names - set(record))
            unexpected = sorted(set(record) - upload.names)
            if missing or unexpected:
                which = f"'{name}.{missing[0]}' is missing" if missing else f"unexpected tensor '{name}.{unexpected[0]}'"
                return which
            reference = sent.array_records.get(upload.reference)
            for key in record:
                array = record[key]
                like = reference[key] if reference is not None and key in reference else None
                if like is not None and (tuple(array.shape) != tuple(like.shape) or array.dtype != like.dtype):
                    return (f"'{name}.{key}' is {array.dtype} {list(array.shape)} where {like.dtype} "
                            f"{list(like.shape)} was sent")
        bad = non_finite(content)
        return f"non-finite values in '{bad}'" if bad is not None else None
