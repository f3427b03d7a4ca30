"""Shared machinery of every private strategy in this package.

One round, for any method (POPri, Private Evolution, DP-FedAvg)::

    sampled  = {i : u_i < q}, u_i ~ U(0, 1) from the strategy's own seeded RNG   (Poisson)
    replies  = clients' vectors v_i, each clipped by the client to ||v_i||_2 <= C
    accepted = {v_i : right length, finite, ||v_i||_2 <= C}            (re-checked here)
    release  = sum_i v_i + N(0, (sigma * C)^2 I)                       (L2 sensitivity C)

and the accountant composes one Poisson-subsampled Gaussian mechanism per round. Subclasses
say what to send (:meth:`train_payload`), how long the vector is (:meth:`vector_length`) and
what the server does with the release (:meth:`server_update`). This base owns sampling,
validation, noise, accounting, the run directory, the round log and resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
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

from popri_flwr.aggregation import check_vector, noisy_sum
from popri_flwr.privacy import PrivacyAccountant
from popri_flwr.run_dir import RunDirectory

logger = logging.getLogger(__name__)

#: RecordDict keys of the protocol between strategies and client apps.
PAYLOAD_CONFIG = "config"
PAYLOAD_ARRAYS = "payload"
REPLY_ARRAYS = "reply"
REPLY_VECTOR = "vector"
REPLY_METRICS = "metrics"


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
    """Seconds spent per named phase of a round (``with timer("dpo"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


class PrivateStrategy(Strategy):
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
        Seed of the strategy's own RNG (sampling and noise). Never the global RNGs.
    round_timeout
        Seconds to wait for replies; late replies count as failed clients.
    node_wait_timeout
        Seconds to wait for ``num_clients`` nodes before giving up with an error.
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
        node_wait_timeout: float = 300.0,
    ) -> None:
        if clip_norm <= 0:
            raise ValueError(f"privacy.clip_norm: must be > 0, got {clip_norm}")
        self.accountant = accountant
        self.clip_norm = float(clip_norm)
        self.num_clients = int(num_clients)
        self.run_dir = run_dir
        self.seed = int(seed)
        self.round_timeout = float(round_timeout)
        self.node_wait_timeout = float(node_wait_timeout)
        self.timer = PhaseTimer()
        self._stats: dict[str, Any] = {}

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

    # ---------------------------------------------------------------- sampling
    def rng_for(self, server_round: int, purpose: str) -> np.random.Generator:
        """A reproducible RNG per (seed, round, purpose): resume draws what a fresh run would."""
        key = int.from_bytes(purpose.encode()[:8].ljust(8, b"\0"), "little")
        return np.random.default_rng([self.seed, server_round, key])

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Block until ``num_clients`` nodes are connected; return their sorted ids."""
        deadline = time.monotonic() + self.node_wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of {self.num_clients} nodes connected after "
                    f"{self.node_wait_timeout:.0f}s; the sampling rate assumes all of them"
                )
            logger.info("Waiting for nodes: %d of %d connected", len(nodes), self.num_clients)
            time.sleep(1.0)
        return nodes

    def sample_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Poisson sampling: each node independently with probability q (may be empty)."""
        nodes = self.wait_for_nodes(grid)
        q = self.accountant.sample_rate
        if q >= 1.0:
            return nodes
        draws = self.rng_for(server_round, "sample").random(len(nodes))
        return [n for n, u in zip(nodes, draws, strict=True) if u < q]

    # ---------------------------------------------------------------- Flower Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients (Poisson, rate q) and send each the round's payload."""
        node_ids = self.sample_nodes(grid, server_round)
        record = self.train_payload(server_round)
        cfg = record.get(PAYLOAD_CONFIG, ConfigRecord())
        cfg["server-round"] = server_round
        cfg["clip-norm"] = self.clip_norm
        cfg["vector-length"] = self.vector_length(server_round)
        record[PAYLOAD_CONFIG] = cfg
        self._stats.update(clients_sampled=len(node_ids), bytes_down=record_nbytes(record))
        logger.info(
            "Round %d: sampled %d of %d clients", server_round, len(node_ids), self.num_clients
        )
        return [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in node_ids
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Re-check every reply, sum the accepted ones and add N(0, (sigma C)^2 I)."""
        dim = self.vector_length(server_round)
        accepted: list[np.ndarray] = []
        failed = rejected = 0
        client_seconds: list[float] = []
        bytes_up: list[int] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                logger.warning(
                    "Round %d: client %s failed: %s", server_round, node, msg.error.reason
                )
                continue
            vector, reason = self._extract_vector(msg, dim)
            if reason is not None:
                rejected += 1
                logger.warning(
                    "Round %d: rejected reply from client %s: %s", server_round, node, reason
                )
                continue
            accepted.append(vector)
            bytes_up.append(record_nbytes(msg.content))
            metrics = msg.content.get(REPLY_METRICS)
            if isinstance(metrics, MetricRecord) and "client-seconds" in metrics:
                client_seconds.append(float(metrics["client-seconds"]))
        sigma = self.accountant.noise_multiplier
        release = noisy_sum(
            accepted, dim, sigma * self.clip_norm, self.rng_for(server_round, "noise")
        )
        self._stats.update(
            clients_replied=len(accepted) + rejected,
            clients_accepted=len(accepted),
            clients_rejected=rejected,
            clients_failed=failed
            + max(0, self._stats.get("clients_sampled", 0) - len(accepted) - rejected - failed),
            bytes_up=int(np.mean(bytes_up)) if bytes_up else 0,
            client_seconds=float(np.mean(client_seconds)) if client_seconds else None,
        )
        metrics = MetricRecord({"clients-accepted": len(accepted), "clients-rejected": rejected})
        return ArrayRecord({"release": Array(release)}), metrics

    def _extract_vector(self, msg: Message, dim: int) -> tuple[np.ndarray | None, str | None]:
        try:
            vector = msg.content[REPLY_ARRAYS][REPLY_VECTOR].numpy()
        except Exception as err:  # noqa: BLE001 - any malformed reply is just rejected
            return None, f"malformed reply ({type(err).__name__}: {err})"
        reason = check_vector(vector, dim, self.clip_norm)
        return (vector if reason is None else None), reason

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
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float | None = None,
        **_: Any,
    ) -> Result:
        """Run (or resume) ``num_rounds`` rounds; stops early rather than overspend.

        Unlike :meth:`flwr.serverapp.strategy.Strategy.start`, this loop resumes from the run
        directory, checks the privacy budget before each round, persists every release before
        using it, and writes one log line per round.
        """
        timeout = self.round_timeout if timeout is None else timeout
        self.summary()
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
                with self.timer("clients"):
                    messages = self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)
                    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
                with self.timer("aggregate"):
                    arrays, _ = self.aggregate_train(rnd, replies)
                    release = arrays["release"].numpy()
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
            with self.timer("evaluate"):
                evaluation = self.evaluate_round(rnd)
            with self.timer("checkpoint"):
                state.update(self.save_checkpoint(rnd))
            record = self._round_record(rnd, update, evaluation, time.perf_counter() - t0)
            self.run_dir.append_round(record)
            state.update(finished_round=rnd, accountant=self.accountant.state_dict())
            self.run_dir.save_state(state)
            result.train_metrics_clientapp[rnd] = MetricRecord(
                {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
            )
            self.log_round(record, num_rounds)
        return result

    def _check_same_mechanism(self, restored: PrivacyAccountant) -> None:
        a = self.accountant
        if (restored.noise_multiplier, restored.sample_rate, restored.delta) != (
            a.noise_multiplier,
            a.sample_rate,
            a.delta,
        ):
            raise ValueError(
                f"privacy: the run being resumed used sigma={restored.noise_multiplier:g}, "
                f"q={restored.sample_rate:g}, delta={restored.delta:g}; now "
                f"sigma={a.noise_multiplier:g}, q={a.sample_rate:g}, delta={a.delta:g}"
            )

    def _round_record(
        self, rnd: int, update: dict[str, Any], evaluation: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        a = self.accountant
        return {
            "round": rnd,
            "epsilon_spent": a.epsilon_spent,
            "epsilon_target": a.target_epsilon,
            "delta": a.delta,
            "noise_multiplier": a.noise_multiplier,
            "sample_rate": a.sample_rate,
            **{
                k: self._stats.get(k)
                for k in (
                    "clients_sampled",
                    "clients_replied",
                    "clients_accepted",
                    "clients_rejected",
                    "clients_failed",
                    "bytes_down",
                    "bytes_up",
                    "client_seconds",
                )
            },
            **update,
            **evaluation,
            "seconds": {
                **{k: round(v, 3) for k, v in self.timer.seconds.items()},
                "total": round(seconds, 3),
            },
        }

    def log_round(self, record: dict[str, Any], num_rounds: int) -> None:
        logger.info(
            "Round %d/%d done: epsilon spent %.4g of %.4g | clients %s sampled, %s accepted, "
            "%s rejected, %s failed | time: %s",
            record["round"],
            num_rounds,
            record["epsilon_spent"],
            record["epsilon_target"],
            record["clients_sampled"],
            record["clients_accepted"],
            record["clients_rejected"],
            record["clients_failed"],
            self.timer.summary(),
        )
