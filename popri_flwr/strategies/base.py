"""Shared machinery of every private strategy in this package.

One round, for any method (POPri, Private Evolution, DP-FedAvg)::

    population = the N distinct clients the connected nodes serve            (checked)
    sampled  = {i : u_i < q}, u_i ~ U(0, 1) from fresh OS entropy           (Poisson, secret)
    replies  = per node, one row v_i per sampled member, clipped to ||v_i||_2 <= C
    accepted = {v_i : right length, finite, ||v_i||_2 <= C}          (re-checked, row by row)
    release  = sum_i v_i + N(0, (sigma * C)^2 I), noise from fresh OS entropy  (sensitivity C)

and the accountant composes one Poisson-subsampled Gaussian mechanism per round. A node serves
one client (a device) or a cohort (a silo's users, or ``simulation.clients_per_node`` clients):
sampling is over clients either way, so q and the sensitivity C are the same. Subclasses
say what to send (:meth:`train_payload`), how long the vector is (:meth:`vector_length`) and
what the server does with the release (:meth:`server_update`). This base owns sampling,
validation, noise, accounting, the run directory, the round log, diagnostics and resume.

What is released (``rounds.jsonl``, ``samples/``, the adapter or model, ``state.json``) is a
function of the noisy releases and public inputs only. Un-noised statistics of the clients
(how many were sampled, failed or rejected and why, client timings, evaluation on held-out
private text) go to :class:`~popri_flwr.privacy.diagnostics.Diagnostics`, off unless enabled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from popri_flwr.privacy.accounting import PrivacyAccountant
from popri_flwr.privacy.aggregation import add_noise, check_rows
from popri_flwr.privacy.client_sampling import poisson_sample
from popri_flwr.privacy.diagnostics import Diagnostics
from popri_flwr.privacy.randomness import secret_rng, seeded_rng
from popri_flwr.protocol import (
    IDENTITY_CONFIG,
    MEMBERS_KEY,
    PAYLOAD_CONFIG,
    REPLY_METRICS,
    reply_identities,
    reply_vector,
)
from popri_flwr.run_dir import RunDirectory

logger = logging.getLogger(__name__)

#: Marker file written into the run directory of a run whose private randomness is seeded.
NOT_DP_MARKER = "NOT_DIFFERENTIALLY_PRIVATE.txt"


class PopulationError(RuntimeError):
    """The connected nodes are not the population the sampling rate and sensitivity assume."""


class TooFewReplies(RuntimeError):
    """Fewer than ``min_reply_fraction`` of a round's sampled clients replied; nothing was
    released or spent, and the run resumes at that round."""


def record_nbytes(record: RecordDict) -> int:
    """Approximate wire size of a RecordDict: array bytes plus config values."""
    total = 0
    for value in record.values():
        if isinstance(value, ArrayRecord):
            total += sum(len(arr.data) for arr in value.values())
        elif isinstance(value, ConfigRecord | MetricRecord):
            for v in value.values():
                items = v if isinstance(v, list) else [v]
                total += sum(len(x) if isinstance(x, str | bytes) else 8 for x in items)
    return total


class PhaseTimer:
    """Seconds spent per named phase of a round (``with timer("dpo"): ...``).

    ``inside[phase]`` names the phases a phase was ever timed within, so that a phase nested
    in one whose duration is private (client-dependent) is kept out of the release too.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.inside: dict[str, set[str]] = {}
        self._open: list[str] = []

    @contextmanager
    def __call__(self, phase: str):
        self.inside.setdefault(phase, set()).update(self._open)
        self._open.append(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._open.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


class PrivateStrategy(Strategy):
    #: The ``strategy.name`` this class is registered under (set by subclasses).
    method: str = ""

    """Base class: Poisson sampling, validated replies, Gaussian noise, accounting, resume.

    Parameters
    ----------
    accountant
        Tracks epsilon; a round that would exceed the target is refused.
    clip_norm
        C, the L2 bound of one client's vector (its sensitivity).
    num_clients
        Population size N the sampling rate refers to; the strategy waits until N nodes are
        connected before sampling (so q is the rate the accountant assumes).
    run_dir
        Where config, round log, samples and checkpoints go.
    seed
        Seed of the *public* randomness (prompts, generation, ...). Client sampling and noise
        never use it: they come from fresh OS entropy every time.
    round_timeout
        Seconds to wait for replies; late replies count as failed clients.
    min_reply_fraction
        When fewer than this share of the sampled clients reply (failed or late), the round
        stops with :class:`TooFewReplies` before anything is noised, released or spent; the
        run resumes at that round with fresh sampling. 0: release whatever replied.
    node_wait_timeout
        Seconds to wait for ``num_clients`` nodes before giving up with an error.
    diagnostics
        Keep un-noised statistics of the clients (counts, rejections with node ids, timings,
        evaluation on held-out private text) in ``diagnostics.jsonl``. Off by default: turn it
        on in simulation, not in a deployment whose run directory may be published.
    debug_noise_seed
        Debugging only, never for a real run: draw client sampling and noise from this seed,
        so they can be reproduced, and anyone with the seed can remove the noise. The run
        directory, the log and every round record are then marked NOT differentially private.
    """

    def __init__(
        self,
        *,
        accountant: PrivacyAccountant,
        clip_norm: float,
        num_clients: int,
        run_dir: RunDirectory,
        seed: int = 0,
        round_timeout: float = 600.0,
        min_reply_fraction: float = 0.5,
        node_wait_timeout: float = 300.0,
        diagnostics: bool = False,
        debug_noise_seed: int | None = None,
    ) -> None:
        if not clip_norm > 0:
            raise ValueError(f"privacy.clip_norm: must be > 0, got {clip_norm}")
        if int(num_clients) < 1:
            raise ValueError(f"num_clients: must be >= 1, got {num_clients}")
        self.accountant = accountant
        self.clip_norm = float(clip_norm)
        self.num_clients = int(num_clients)
        self.run_dir = run_dir
        self.seed = int(seed)
        if not 0.0 <= min_reply_fraction <= 1.0:
            raise ValueError(
                f"simulation.min_reply_fraction: must be in [0, 1], got {min_reply_fraction}"
            )
        self.round_timeout = float(round_timeout)
        self.min_reply_fraction = float(min_reply_fraction)
        self.node_wait_timeout = float(node_wait_timeout)
        self.timer = PhaseTimer()
        self.diagnostics = Diagnostics(run_dir.path, diagnostics)
        self.debug_noise_seed = None if debug_noise_seed is None else int(debug_noise_seed)
        self._stats: dict[str, Any] = {}
        self._identities: dict[int, list[str]] = {}
        self._members_sent: dict[int, int] = {}
        self._clean_sum: np.ndarray | None = None

    @property
    def differentially_private(self) -> bool:
        """False for a run without noise (epsilon = inf) or with seeded (debug) noise."""
        return self.debug_noise_seed is None and self.accountant.noise_multiplier > 0

    @classmethod
    def create(
        cls, *, num_clients: int, run_dir: str, rounds: int = 3, **sections: Any
    ) -> PrivateStrategy:
        """Build this strategy, its models and accountant from plain values.

        Example::

            strategy = PopriStrategy.create(
                num_clients=100, run_dir="outputs/popri", rounds=3,
                privacy={"epsilon": 1.0, "sample_rate": 0.1},
                strategy={"num_prompts": 16, "samples_per_prompt": 6, "reject_rank": 3},
            )

        See :func:`popri_flwr.strategies.factory.create_strategy` for the sections.
        """
        from popri_flwr.strategies.factory import create_strategy

        return create_strategy(
            cls.method, num_clients=num_clients, run_dir=run_dir, rounds=rounds, **sections
        )

    # ---------------------------------------------------------------- hooks for subclasses
    def prepare(self, finished_round: int) -> None:
        """Initialise (fresh run) or restore (resume after ``finished_round``) method state."""

    def train_payload(self, server_round: int) -> RecordDict:
        """What every sampled client receives this round."""
        raise NotImplementedError

    def vector_length(self, server_round: int) -> int:
        """Length of the vector each client must return this round."""
        raise NotImplementedError

    def server_update(self, server_round: int, release: np.ndarray) -> dict[str, Any]:
        """Use the noisy release (e.g. DPO + regenerate). Returns metrics for the round log."""
        raise NotImplementedError

    def evaluate_round(self, server_round: int) -> dict[str, Any]:
        """Evaluation-only metrics for the round log (default: none)."""
        return {}

    def save_checkpoint(self, server_round: int) -> dict[str, Any]:
        """Persist method state after ``server_round``; returns entries for ``state.json``."""
        return {}

    # ---------------------------------------------------------------- randomness
    def rng_for(self, server_round: int, purpose: str) -> np.random.Generator:
        """Seeded RNG per (seed, round, purpose) for PUBLIC randomness (prompts, generation)."""
        return seeded_rng(self.seed, server_round, purpose)

    def private_rng(self, server_round: int, purpose: str) -> np.random.Generator:
        """RNG for client sampling and noise: fresh OS entropy, never stored or logged."""
        if self.debug_noise_seed is not None:
            return seeded_rng(self.debug_noise_seed, server_round, purpose)
        return secret_rng()

    # ---------------------------------------------------------------- the population
    def wait_for_population(self, grid: Grid) -> dict[int, list[str]]:
        """Block until the connected nodes serve ``num_clients`` distinct clients.

        Each node says which clients it serves (one, or a cohort); new nodes are asked once.

        Returns
        -------
        dict
            Node id -> the client ids it serves, nodes in sorted order.

        Raises
        ------
        PopulationError
            If the nodes serve more than ``num_clients`` clients, a client is claimed twice, a
            node does not say, or the population is not complete before the timeout.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            self.verify_identities(grid, nodes, self.round_timeout)
            served = sum(len(self._identities[n]) for n in nodes)
            if served > self.num_clients:
                raise PopulationError(
                    f"{len(nodes)} nodes are connected and serve {served} clients but the "
                    f"population is {self.num_clients} clients; refusing to sample (the sampling "
                    "rate and the accountant assume exactly the population)"
                )
            if served == self.num_clients:
                return {n: self._identities[n] for n in nodes}
            if time.monotonic() > deadline:
                raise PopulationError(
                    f"only {served} of {self.num_clients} clients connected (on {len(nodes)} "
                    f"nodes) after {self.node_wait_timeout:.0f}s; the sampling rate assumes all "
                    "of them"
                )
            logger.info("Waiting for clients: %d of %d connected", served, self.num_clients)
            time.sleep(1.0)

    def verify_identities(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        """Ask nodes not seen before which clients they serve; refuse a client on two nodes.

        A client served by two nodes would answer twice: its sensitivity would be 2C while
        the noise is calibrated for C.

        Raises
        ------
        PopulationError
            If a node does not say, or two connected nodes claim the same client.
        """
        new = [n for n in nodes if n not in self._identities]
        if new:
            query = RecordDict({PAYLOAD_CONFIG: ConfigRecord({IDENTITY_CONFIG: True})})
            messages = [
                Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in new
            ]
            for reply in grid.send_and_receive(messages, timeout=timeout):
                if reply.has_error():
                    continue
                ids = reply_identities(reply)
                if ids is not None:
                    self._identities[reply.metadata.src_node_id] = ids
        missing = [n for n in nodes if n not in self._identities]
        if missing:
            raise PopulationError(
                f"{len(missing)} node(s) did not say which client they serve (e.g. node "
                f"{missing[0]}); every node must run a client app that answers the identity "
                "query (popri_flwr.client_apps)"
            )
        owner: dict[str, int] = {}
        for n in nodes:
            for client in self._identities[n]:
                if client in owner:
                    raise PopulationError(
                        f"nodes {owner[client]} and {n} both serve client {client!r}; refusing "
                        "to sample (one client, one vector: a client served twice would count "
                        "twice)"
                    )
                owner[client] = n

    def sample_clients(self, grid: Grid, server_round: int) -> dict[int, list[int]]:
        """Poisson sampling of the population's *clients*, from secret randomness.

        Returns
        -------
        dict
            Node id -> indices of its sampled members (nodes without one are left out).
        """
        population = self.wait_for_population(grid)
        clients = [(node, i) for node, ids in population.items() for i in range(len(ids))]
        q = self.accountant.sample_rate
        sampled: dict[int, list[int]] = {}
        for node, i in poisson_sample(clients, q, self.private_rng(server_round, "sample")):
            sampled.setdefault(node, []).append(i)
        return sampled

    def sample_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The nodes with at least one sampled client (one client per node: the sample)."""
        return list(self.sample_clients(grid, server_round))

    # ---------------------------------------------------------------- Flower Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients (Poisson, rate q); send each node the payload and its members."""
        sampled = self.sample_clients(grid, server_round)
        record = self.train_payload(server_round)
        cfg = record.get(PAYLOAD_CONFIG, ConfigRecord())
        for key, value in (getattr(self, "_train_config", None) or {}).items():
            cfg[key] = value
        cfg["server-round"] = server_round
        cfg["clip-norm"] = self.clip_norm
        cfg["vector-length"] = self.vector_length(server_round)
        record[PAYLOAD_CONFIG] = cfg
        self._stats.update(bytes_down=record_nbytes(record))
        self._members_sent = {node: len(m) for node, m in sampled.items()}
        n_sampled = sum(self._members_sent.values())
        self.diagnostics.add(clients_sampled=n_sampled, nodes_contacted=len(sampled))
        self.diagnostics.log(
            logging.INFO,
            "Round %d: sampled %d of %d clients (on %d nodes)",
            server_round,
            n_sampled,
            self.num_clients,
            len(sampled),
        )
        messages = []
        for node, members in sampled.items():
            content = RecordDict(dict(record.items()))  # payload arrays shared, not copied
            content[PAYLOAD_CONFIG] = ConfigRecord({**cfg, MEMBERS_KEY: members})
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Re-check every row of every reply, sum the accepted ones, add N(0, (sigma C)^2 I).

        Replies are consumed one at a time (an iterator is fine), so memory stays bounded by
        one node's reply however many clients answer.
        """
        dim = self.vector_length(server_round)
        total = np.zeros(dim, dtype=np.float64)
        sent = getattr(self, "_members_sent", {})
        accepted = failed = rejected = 0
        client_seconds: list[float] = []
        bytes_up: list[int] = []
        rejections: list[dict[str, Any]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            rows = sent.get(node, 1)
            if msg.has_error():
                failed += rows
                self.diagnostics.log(
                    logging.WARNING,
                    "Round %d: node %s failed (%d clients): %s",
                    server_round,
                    node,
                    rows,
                    msg.error.reason,
                )
                continue
            try:
                matrix, reasons = check_rows(reply_vector(msg), rows, dim, self.clip_norm)
            except Exception as err:  # noqa: BLE001 - any malformed reply is just rejected
                matrix, reasons = None, [f"malformed reply ({type(err).__name__}: {err})"] * rows
            bad = [i for i, r in enumerate(reasons) if r is not None]
            if bad:
                rejected += len(bad)
                rejections += [{"node": int(node), "row": i, "reason": reasons[i]} for i in bad]
                # The operator always learns that bad replies arrive; which node and the
                # values seen are diagnostics.
                logger.warning(
                    "Round %d: rejected %s: %s",
                    server_round,
                    "a client reply" if len(bad) == 1 else f"{len(bad)} client rows of a reply",
                    _kind(reasons[bad[0]] or ""),
                )
                self.diagnostics.log(
                    logging.WARNING,
                    "Round %d: rejected %d row(s) from node %s: %s",
                    server_round,
                    len(bad),
                    node,
                    reasons[bad[0]],
                )
            if matrix is not None and len(bad) < rows:
                good = np.delete(matrix, bad, axis=0) if bad else matrix
                total += good.sum(axis=0, dtype=np.float64)  # no float64 copy of the reply
                accepted += len(good)
                bytes_up.append(record_nbytes(msg.content) // rows)
            metrics = msg.content.get(REPLY_METRICS)
            if isinstance(metrics, MetricRecord) and "client-seconds" in metrics:
                client_seconds.append(float(metrics["client-seconds"]))
        sampled = sum(sent.values()) if sent else accepted + rejected + failed
        self._check_replies(server_round, accepted + rejected, sampled)
        if self.diagnostics.enabled:  # simulation only: the noise-free sum, never released
            self._clean_sum = total.copy()
        sigma = self.accountant.noise_multiplier
        release = add_noise(total, sigma * self.clip_norm, self.private_rng(server_round, "noise"))
        self.diagnostics.add(
            clients_replied=accepted + rejected,
            clients_accepted=accepted,
            clients_rejected=rejected,
            clients_failed=failed + max(0, sampled - accepted - rejected - failed),
            rejections=rejections[:100],
            bytes_up=int(np.mean(bytes_up)) if bytes_up else 0,
            client_seconds=float(np.mean(client_seconds)) if client_seconds else None,
        )
        return ArrayRecord({"release": Array(release)}), None

    def _check_replies(self, server_round: int, replied: int, sampled: int) -> None:
        """Raise :class:`TooFewReplies` when under ``min_reply_fraction`` of ``sampled`` replied.

        Called before the noise is drawn: the stopped round releases and spends nothing. The
        counts go to the diagnostics log only (they are un-noised statistics of the clients).
        """
        if sampled == 0 or replied >= self.min_reply_fraction * sampled:
            return
        self.diagnostics.log(
            logging.ERROR,
            "Round %d: %d of %d sampled clients replied (min_reply_fraction=%g)",
            server_round,
            replied,
            sampled,
            self.min_reply_fraction,
        )
        raise TooFewReplies(
            f"Round {server_round}: fewer than simulation.min_reply_fraction="
            f"{self.min_reply_fraction:g} of the sampled clients replied (failed or late nodes; "
            "see the log). Stopped before the release: nothing of this round was released or "
            "spent. Fix the nodes (in simulation: more memory per client actor, or fewer runs "
            "at once) and run the same command again to resume."
        )

    def iter_replies(
        self, grid: Grid, messages: list[Message], timeout: float
    ) -> Iterable[Message]:
        """Send the round's messages and yield replies as they arrive, until all or ``timeout``.

        Flower's ``send_and_receive``, streamed (each reply can be summed and dropped before
        the next arrives), with a progress bar (shown only with diagnostics on: how many
        clients answered is an un-noised statistic) and a short poll interval.
        """
        if not messages:
            return
        try:
            pending = set(grid.push_messages(messages))
        except NotImplementedError:  # a Grid without push/pull (e.g. a test double)
            yield from grid.send_and_receive(messages, timeout=timeout)
            return
        from tqdm.auto import tqdm

        deadline = time.monotonic() + timeout
        with tqdm(
            total=len(pending), desc="node replies", leave=False,
            disable=not self.diagnostics.enabled,
        ) as bar:  # fmt: skip
            while pending and time.monotonic() < deadline:
                got = list(grid.pull_messages(pending))
                pending -= {m.metadata.reply_to_message_id for m in got}
                bar.update(len(got))
                yield from got
                if pending:
                    time.sleep(_POLL_SECONDS)

    def collect_replies(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """All replies of :meth:`iter_replies` as a list."""
        return list(self.iter_replies(grid, messages, timeout))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: clients only ever return the clipped vector."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        a = self.accountant
        logger.info(
            "%s: N=%d clients, q=%.4g (Poisson), sigma=%.4g, C=%.3g, target (eps=%s, delta=%g)",
            type(self).__name__,
            self.num_clients,
            a.sample_rate,
            a.noise_multiplier,
            self.clip_norm,
            a.target_epsilon,
            a.delta,
        )

    # ---------------------------------------------------------------- the loop
    def final_arrays(self) -> ArrayRecord:
        """What :attr:`Result.arrays` holds after the run (default: nothing; see subclasses)."""
        return ArrayRecord()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run (or resume) ``num_rounds`` rounds; stops early rather than overspend.

        Flower's :meth:`~flwr.serverapp.strategy.Strategy.start` contract, plus what a private
        run needs: it resumes from the run directory, checks the privacy budget before each
        round, persists every release before using it, and writes one line per round.

        Parameters
        ----------
        grid
            The Flower Grid.
        initial_arrays
            Unused: POPri and PE send synthetic samples, DP-FedAvg its own model.
        num_rounds
            Rounds to reach (counting rounds finished before a resume).
        timeout
            Seconds to wait for replies (default: ``round_timeout``).
        train_config
            Extra public settings sent to every sampled client with each round's payload.
        evaluate_config
            Unused: there is no federated evaluation (clients only return their vector).
        evaluate_fn
            ``evaluate_fn(round, arrays)`` after each round on :meth:`final_arrays`; its metrics
            go to ``Result.evaluate_metrics_serverapp``. If it reads private data, its output is
            a diagnostic, not part of the release.

        Returns
        -------
        Result
            ``arrays`` (:meth:`final_arrays`), the released round metrics per round
            (``train_metrics_clientapp``) and ``evaluate_fn``'s metrics.
        """
        with self.run_dir.exclusive():  # one run per directory at a time
            return self._start(grid, num_rounds, timeout, train_config, evaluate_fn)

    def _start(
        self,
        grid: Grid,
        num_rounds: int,
        timeout: float | None,
        train_config: ConfigRecord | None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> Result:
        """:meth:`start`'s rounds, with the run directory held."""
        timeout = self.round_timeout if timeout is None else timeout
        self._train_config = train_config
        self.run_dir.check_accounted()  # a lost state.json must not mean spending again
        self.summary()
        self._mark_if_not_private()
        state = self.run_dir.load_state() or {}
        finished = int(state.get("finished_round", 0))
        released = int(state.get("released_round", 0))
        if "accountant" in state:
            restored = PrivacyAccountant.from_state_dict(state["accountant"])
            self._check_same_mechanism(restored)
            self.accountant = restored
        if finished:
            logger.info(
                "Resuming after round %d (epsilon spent %.4g)",
                finished,
                self.accountant.epsilon_spent,
            )
        self.run_dir.truncate_rounds(finished)
        self.diagnostics.truncate(finished)
        self.prepare(finished)
        result = Result()
        for rnd in range(finished + 1, num_rounds + 1):
            self.timer, self._stats = PhaseTimer(), {}
            t0 = time.perf_counter()
            if released == rnd:
                release = self.run_dir.load_array(f"release_round_{rnd:03d}")
                self._stats.update(state.get("release_stats", {}))
                logger.info("Round %d: finishing from the saved release (no new spend)", rnd)
            else:
                if self.accountant.would_exceed():
                    logger.error(
                        "Round %d refused: epsilon would reach %.4g > target %.4g",
                        rnd,
                        self.accountant.epsilon_after(),
                        self.accountant.target_epsilon,
                    )
                    break
                with self.timer("clients"):  # sampling, replies, checks and the noisy sum
                    messages = list(self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
                    replies = self.iter_replies(grid, messages, timeout)
                    arrays, _ = self.aggregate_train(rnd, replies)
                    release = arrays["release"].numpy()
                with self.timer("aggregate"):
                    # Persist the release, then count it: a crash after this point resumes
                    # from the file instead of asking clients (and spending) again.
                    self.run_dir.save_array(f"release_round_{rnd:03d}", release)
                    self.accountant.spend_round()
                    state.update(
                        released_round=rnd,
                        accountant=self.accountant.state_dict(),
                        release_stats=dict(self._stats),
                    )
                    self.run_dir.save_state(state)
            update = self.server_update(rnd, release)
            evaluation: dict[str, Any] = {}
            if self.diagnostics.enabled:  # evaluation reads held-out private text
                with self.timer("evaluate"):
                    evaluation = self.evaluate_round(rnd)
            with self.timer("checkpoint"):
                state.update(self.save_checkpoint(rnd))
            record = self._round_record(rnd, update)
            self.run_dir.append_round(record)
            state.update(finished_round=rnd, accountant=self.accountant.state_dict())
            self.run_dir.save_state(state)
            self.diagnostics.write_round(
                rnd,
                {
                    **evaluation,
                    "seconds": {
                        **{k: round(v, 3) for k, v in self.timer.seconds.items()},
                        "total": round(time.perf_counter() - t0, 3),
                    },
                },
            )
            result.train_metrics_clientapp[rnd] = MetricRecord(
                {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
            )
            self.log_round(record, num_rounds)
            if evaluate_fn is not None:
                metrics = evaluate_fn(rnd, self.final_arrays())
                if metrics is not None:
                    result.evaluate_metrics_serverapp[rnd] = metrics
        result.arrays = self.final_arrays()
        return result

    def _mark_if_not_private(self) -> None:
        """Say it everywhere when this run's private randomness is seeded (debugging only)."""
        if self.debug_noise_seed is None:
            return
        msg = (
            "NOT DIFFERENTIALLY PRIVATE: privacy.debug_noise_seed is set, so client sampling "
            "and noise can be reproduced by anyone who knows the seed (debugging only)."
        )
        logger.error(msg)
        (self.run_dir.path / NOT_DP_MARKER).write_text(msg + "\n")

    def _check_same_mechanism(self, restored: PrivacyAccountant) -> None:
        a = self.accountant
        was = (restored.noise_multiplier, restored.sample_rate, restored.delta)
        now = (a.noise_multiplier, a.sample_rate, a.delta)
        was_acc, now_acc = getattr(restored, "accounting", "rdp"), getattr(a, "accounting", "rdp")
        if was != now or was_acc != now_acc:
            raise ValueError(
                f"privacy: the run being resumed used sigma={restored.noise_multiplier:g}, "
                f"q={restored.sample_rate:g}, delta={restored.delta:g}, accounting={was_acc}; "
                f"now sigma={a.noise_multiplier:g}, q={a.sample_rate:g}, delta={a.delta:g}, "
                f"accounting={now_acc}"
            )

    def _round_record(self, rnd: int, update: dict[str, Any]) -> dict[str, Any]:
        """The released round record: privacy spend, public costs, server-side metrics.

        Nothing here is an un-noised statistic of the clients: counts, client timings and
        evaluation on private text are diagnostics.
        """
        a = self.accountant
        server_phases = {
            k: round(v, 3)
            for k, v in self.timer.seconds.items()
            if not ({k} | self.timer.inside.get(k, set())) & set(_CLIENT_DEPENDENT_PHASES)
        }
        return {
            "round": rnd,
            "differentially_private": self.differentially_private,
            "epsilon_spent": a.epsilon_spent,
            "epsilon_target": a.target_epsilon,
            "delta": a.delta,
            "noise_multiplier": a.noise_multiplier,
            "sample_rate": a.sample_rate,
            "bytes_down": self._stats.get("bytes_down"),
            **update,
            "seconds": server_phases,
        }

    def log_round(self, record: dict[str, Any], num_rounds: int) -> None:
        """One line per round: spend and server time; client counts only with diagnostics."""
        tag = "" if self.differentially_private else " [NOT differentially private]"
        logger.info(
            "Round %d/%d done%s: epsilon spent %.4g of %.4g | time: %s",
            record["round"],
            num_rounds,
            tag,
            record["epsilon_spent"],
            record["epsilon_target"],
            ", ".join(f"{k} {v:.1f}s" for k, v in record["seconds"].items()),
        )
        d = self.diagnostics
        d.log(
            logging.INFO,
            "Round %d diagnostics (not released): clients %s sampled, %s accepted, "
            "%s rejected, %s failed | client phase %.1fs",
            record["round"],
            d.last.get("clients_sampled"),
            d.last.get("clients_accepted"),
            d.last.get("clients_rejected"),
            d.last.get("clients_failed"),
            d.last.get("seconds", {}).get("clients", 0.0),
        )


def eval_embeddings_for(
    cfg: Any, federation: Any, embedder: Any, common: dict[str, Any]
) -> np.ndarray | None:
    """Embeddings of a seeded subsample of held-out private text, for the diagnostic FID.

    None unless diagnostics are on (``common["diagnostics"]``) and ``evaluation.fid``.
    """
    if not (common.get("diagnostics") and cfg.evaluation.fid):
        return None
    texts = federation.eval_sample(cfg.evaluation.max_eval_texts, cfg.seed)
    return embedder.embed(texts) if len(texts) >= 2 else None


#: Seconds between pulls for replies (Flower's own loop sleeps 3 s on the HTTP grid).
_POLL_SECONDS = 0.2

#: Phases whose duration depends on the sampled clients (how many, how much data) or on
#: held-out private text (evaluation); phases timed within them count as theirs.
_CLIENT_DEPENDENT_PHASES = ("clients", "aggregate", "evaluate")


def _kind(reason: str) -> str:
    """The kind of a rejection, without the values seen (those are diagnostics)."""
    for key, kind in (
        ("exceeds the clip bound", "L2 norm over the clip bound"),
        ("non-finite", "non-finite values"),
        ("wrong shape", "wrong length"),
        ("wrong dtype", "wrong dtype"),
    ):
        if key in reason:
            return kind
    return "malformed reply"
