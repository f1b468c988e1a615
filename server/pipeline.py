"""The round as a pipeline with named plug-in points.

One federated round (McMahan et al. 2017, Algorithm 1, seen from the server) runs these steps in order;
:meth:`server.federation.Federation.run_round` is exactly this list::

    configure       the train config for round t            (privacy: σ for the sites, the run's budget)
    exchange        w_t out to the sampled sites, replies in
    inspect         look at every reply before anything uses it
                                                           (malformed updates dropped, lost sites noted,
                                                            node states saved; attacks will observe here)
    aggregate       the strategy's aggregate_train → w_{t+1}  (privacy: the server's clip before it)
    after-aggregate the global arrays to keep and broadcast  (privacy: noise on the aggregate)
    evaluate        federated evaluation, then the server's own test set
    record          metrics.jsonl, progress, example plots    (each record to the plug-ins: experiment trackers)
    checkpoint      the state --resume needs                 (node states)

Two points frame the rounds: ``recorded`` sees every ``metrics.jsonl`` record once it is written (the round's
and an attack's), ``run_ended`` the run's end (its summary, or ``None`` when it stopped early).

A plug-in is a :class:`RoundPlugin` that overrides the points it needs; every other point is a no-op.
:class:`Plugins` calls them in registration order. A plug-in sees and may change the :class:`Round`
it is given: replace a reply by an error reply (a dropped update), change the config, replace the
aggregate. What a plug-in adds to the run's summary or checkpoint it returns from :meth:`RoundPlugin.report`
and :meth:`RoundPlugin.checkpoint`.

Plug-ins today: :class:`server.replies.ReplyCheck` (malformed and implausible updates),
:class:`server.node_states.NodeStates` (lost sites, node-state copies), :class:`server.privacy_round.PrivacyRound`
(the server half of a privacy mechanism and the run's ε), :class:`server.example_plots.ExamplePlots` (the
global model's output every k rounds), :class:`server.tracking.Tracking` (MLflow, TensorBoard). See
``docs/architecture.md`` for how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

if TYPE_CHECKING:  # pragma: no cover
    from flwr.serverapp import Grid

    from server.exchange import Exchange
    from strategies.base import Cohort


class FederationError(RuntimeError):
    """A run that cannot go on (too few clients answered, no usable update); one-line message."""


class BudgetSpent(Exception):
    """The privacy budget ends the run: the round's training is not used, earlier rounds stand.

    Parameters
    ----------
    reason : str
        One line: who ran out, and of what.
    record_train : bool
        Write the round's train record (who ran out) before the run ends.
    """

    def __init__(self, reason: str, *, record_train: bool = False) -> None:
        super().__init__(reason)
        self.record_train = record_train


@dataclass
class Round:
    """What one round has produced so far, handed from point to point.

    Attributes
    ----------
    number : int
        t, counted from 1.
    arrays : ArrayRecord
        w_t at the start; the new global arrays once aggregated.
    config : ConfigRecord
        The train config (the scenario, the round, what plug-ins add at ``configure``).
    cohort : Cohort
        Node id ↔ partition id.
    grid : Grid
        The grid of the run (for plug-ins that must talk to nodes themselves).
    messages : list of Message
        The train messages sent (``configure_train``'s output).
    train : Exchange or None
        The train replies and what travelled; plug-ins at ``inspect`` may replace replies.
    train_metrics : MetricRecord or None
        The strategy's aggregated train metrics.
    headline : dict
        The round's metrics for the progress line.
    """

    number: int
    arrays: ArrayRecord
    config: ConfigRecord
    cohort: Cohort
    grid: Grid
    messages: list[Message] = field(default_factory=list)
    train: Exchange | None = None
    train_metrics: MetricRecord | None = None
    headline: dict[str, float | None] = field(default_factory=dict)

    def sent_to(self, reply: Message) -> Message:
        """The train message ``reply`` answers."""
        wanted = reply.metadata.reply_to_message_id
        return next(message for message in self.messages if message.metadata.message_id == wanted)


class RoundPlugin:
    """A participant of the round pipeline; each method is one point and does nothing by default."""

    def configure(self, round_: Round) -> None:
        """Before ``configure_train``: add to ``round_.config``, or raise :class:`BudgetSpent`."""

    def inspect(self, round_: Round, phase: str, done: Exchange, sent: list[Message]) -> None:
        """A phase's replies are in (``phase``: ``"train"`` or ``"evaluate"``; ``sent``: its messages).

        Replace a reply in ``done.replies`` by an error reply to drop it; the strategy never sees the
        original, and metrics.jsonl records the error.
        """

    def before_aggregate(self, round_: Round) -> None:
        """The usable train replies, just before ``aggregate_train`` (transform them in place)."""

    def aggregate_failed(self, round_: Round) -> None:
        """``aggregate_train`` gave no model or too few usable updates: raise :class:`BudgetSpent` if that is
        the budget's doing (the round loop raises its own error otherwise)."""

    def after_aggregate(self, round_: Round) -> None:
        """``round_.arrays`` holds the aggregate; replace it to change what is kept and broadcast."""

    def round_done(self, round_: Round) -> None:
        """The round is evaluated and recorded."""

    def recorded(self, record: dict[str, Any]) -> None:
        """``record`` was just written to ``metrics.jsonl`` (read it; the file holds what it holds)."""

    def run_ended(self, summary: dict[str, Any] | None) -> None:
        """The run is over: ``summary`` is what ``summary.json`` holds, ``None`` when the run stopped early (an
        error, Ctrl-C; a ``--resume`` may continue it)."""

    def checkpoint(self) -> dict[str, Any]:
        """Entries to add to the checkpoint's ``extra`` (what a resumed run gives back to :meth:`resume`)."""
        return {}

    def resume(self, extra: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Restore from a checkpoint's ``extra`` and the ``metrics.jsonl`` records it kept."""

    def report(self) -> dict[str, Any]:
        """Entries to add to ``summary.json``'s privacy block."""
        return {}


class Plugins(RoundPlugin):
    """Several plug-ins as one: each point calls every plug-in in order."""

    def __init__(self, plugins: list[RoundPlugin]) -> None:
        self.plugins = plugins

    def configure(self, round_: Round) -> None:
        for plugin in self.plugins:
            plugin.configure(round_)

    def inspect(self, round_: Round, phase: str, done: Exchange, sent: list[Message]) -> None:
        for plugin in self.plugins:
            plugin.inspect(round_, phase, done, sent)

    def before_aggregate(self, round_: Round) -> None:
        for plugin in self.plugins:
            plugin.before_aggregate(round_)

    def aggregate_failed(self, round_: Round) -> None:
        for plugin in self.plugins:
            plugin.aggregate_failed(round_)

    def after_aggregate(self, round_: Round) -> None:
        for plugin in self.plugins:
            plugin.after_aggregate(round_)

    def round_done(self, round_: Round) -> None:
        for plugin in self.plugins:
            plugin.round_done(round_)

    def recorded(self, record: dict[str, Any]) -> None:
        for plugin in self.plugins:
            plugin.recorded(record)

    def run_ended(self, summary: dict[str, Any] | None) -> None:
        for plugin in self.plugins:
            plugin.run_ended(summary)

    def checkpoint(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for plugin in self.plugins:
            extra.update(plugin.checkpoint())
        return extra

    def resume(self, extra: dict[str, Any], records: list[dict[str, Any]]) -> None:
        for plugin in self.plugins:
            plugin.resume(extra, records)

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for plugin in self.plugins:
            report.update(plugin.report())
        return report
