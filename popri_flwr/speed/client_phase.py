"""Client-phase speed: one simulated node per client (the old path) vs cohort nodes.

A round's client phase is everything between "sample" and "release": the identity check,
sending the samples' embeddings, the clients' scoring, the replies, the server's row-by-row
checks, the sum and the noise. It runs here through the real Flower simulation engine (Ray)
and the real client app; only the server's generation and DPO are left out, by
:class:`ScoringProbeStrategy`, which sends fixed sample embeddings every round.

Two cases (issue 10):

``client_phase_demo``
    The demo federation (237 SOTU clients, 8 training paragraphs each, q = 0.1) scoring 96
    samples (real MiniLM embeddings of public paragraphs), 3 rounds; clients embed their
    paragraphs on first contact, as in the demo.
``client_phase_72k``
    72,000 synthetic clients (3 random unit "paragraph" embeddings each, generated on the
    node) x 18,000 random unit sample embeddings, full participation (q = 1) as in the paper.
    The old path is timed on a subset and extrapolated linearly (the table says so).

Seconds are the strategy's own ``clients`` phase (``diagnostics.jsonl``); Ray start-up is not
counted. Peak memory is the largest sum of the proportional set size (PSS: shared pages split
between the processes that map them) of this process and all its children (Ray's GCS, raylet,
object store and client actors), sampled twice a second.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """Client-phase seconds of each round, how many clients each sampled, peak memory."""

    seconds: list[float]
    sampled: list[int]
    peak_bytes: int

    def seconds_per_client(self) -> float:
        return sum(self.seconds) / max(1, sum(self.sampled))


def unit_rows(rng: np.random.Generator, n: int, dim: int = 384) -> np.ndarray:
    """``n`` random unit vectors (float32)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic_cohorts(
    num_clients: int, clients_per_node: int, texts_per_client: int = 3, dim: int = 384
) -> Callable[[Any], Any]:
    """``load_cohort`` for synthetic clients: node ``p`` serves clients ``p*c .. p*c + c - 1``.

    Each client is ``texts_per_client`` random unit embeddings, drawn on the node from a seed
    of its index (public: these clients are made up).
    """

    def load(context: Any) -> Any:
        from popri_flwr.client_apps.resources import Cohort, NodeData
        from popri_flwr.models.embedding import DEFAULT_EMBEDDER

        p = int(context.node_config["partition-id"])
        first = p * clients_per_node
        ids = range(first, min(first + clients_per_node, num_clients))
        rng = np.random.default_rng([17, p])
        emb = unit_rows(rng, len(ids) * texts_per_client, dim)
        members = [
            NodeData.from_embeddings(
                f"synthetic:{num_clients}:{i}",
                DEFAULT_EMBEDDER,
                emb[k * texts_per_client : (k + 1) * texts_per_client],
            )
            for k, i in enumerate(ids)
        ]
        return Cohort([f"synthetic-{i}" for i in ids], members)

    return load


class _PeakMemory:
    """Largest PSS sum of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_client_phase(
    *,
    sample_emb: np.ndarray,
    num_clients: int,
    clients_per_node: int,
    rounds: int,
    sample_rate: float,
    load_cohort: Callable[[Any], Any] | None = None,
    data_overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
) -> PhaseResult:
    """Simulate ``rounds`` client phases over ``num_clients`` clients; time each one.

    Either ``load_cohort`` (synthetic clients) or the run config's federation
    (``data_overrides``, e.g. ``["experiment=demo"]``) provides the clients' data.
    """
    from flwr.simulation import run_simulation

    from popri_flwr.client_apps.app import make_client_app
    from popri_flwr.hydra_config import load_config
    from popri_flwr.models.embedding import DEFAULT_EMBEDDER
    from popri_flwr.privacy.accounting import PrivacyAccountant
    from popri_flwr.privacy.diagnostics import read_diagnostics
    from popri_flwr.run_dir import RunDirectory
    from popri_flwr.server_app import make_server_app
    from popri_flwr.simulation import backend_config
    from popri_flwr.speed.probe import ScoringProbeStrategy

    tmp = None
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="popri-speed-")
        run_dir = tmp.name
    cfg = load_config(
        [
            *(data_overrides or []),
            f"rounds={rounds}",
            f"simulation.clients_per_node={clients_per_node}",
            f"run_dir={run_dir}",
        ]
    )
    accountant = PrivacyAccountant(
        noise_multiplier=1.0, sample_rate=sample_rate, delta=1e-5, target_epsilon=math.inf
    )
    strategy = ScoringProbeStrategy(
        sample_emb=sample_emb,
        embedder_name=DEFAULT_EMBEDDER,
        accountant=accountant,
        clip_norm=1.0,
        num_clients=num_clients,
        run_dir=RunDirectory(Path(run_dir)),
        diagnostics=True,
    )
    client_app = make_client_app(load_cohort=load_cohort, config=cfg)
    nodes = cfg.simulation.num_nodes(num_clients)
    logger.info(
        "client phase: %d clients on %d nodes, %d samples, q=%g, %d round(s)",
        num_clients,
        nodes,
        len(sample_emb),
        sample_rate,
        rounds,
    )
    try:
        with _PeakMemory() as memory:
            run_simulation(
                server_app=make_server_app(cfg, strategy),
                client_app=client_app,
                num_supernodes=nodes,
                backend_name="ray",
                backend_config=backend_config(cfg),
            )
        diags = read_diagnostics(Path(run_dir))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if len(diags) < rounds:
        raise RuntimeError(f"client phase: only {len(diags)} of {rounds} rounds finished")
    return PhaseResult(
        seconds=[float(d["seconds"]["clients"]) for d in diags],
        sampled=[int(d.get("clients_sampled", 0)) for d in diags],
        peak_bytes=memory.peak,
    )


def demo_sample_embeddings(n: int = 96) -> np.ndarray:
    """MiniLM embeddings of ``n`` public paragraphs, standing in for a demo round's samples."""
    from popri_flwr.models.embedding import DEFAULT_EMBEDDER, get_embedder
    from popri_flwr.speed.generation import public_paragraphs

    return get_embedder(DEFAULT_EMBEDDER, "cpu").embed(public_paragraphs(limit=n))


def compare_client_phase_demo(clients_per_node: int = 24, rounds: int = 3) -> dict[str, Any]:
    """The demo's client phase: one node per client vs ``clients_per_node`` per node.

    The number sampled is Binomial(237, 0.1) and differs between runs, so both are compared
    per sampled client and scaled to the expected N q clients of a round.
    """
    emb = demo_sample_embeddings()
    overrides = ["experiment=demo"]
    from popri_flwr.hydra_config import load_config

    n = load_config(overrides).simulation.population(_demo_clients(overrides))
    q = 0.1
    old = run_client_phase(
        sample_emb=emb, num_clients=n, clients_per_node=1, rounds=rounds, sample_rate=q,
        data_overrides=overrides,
    )  # fmt: skip
    new = run_client_phase(
        sample_emb=emb, num_clients=n, clients_per_node=clients_per_node, rounds=rounds,
        sample_rate=q, data_overrides=overrides,
    )  # fmt: skip
    expected = n * q
    return _row(
        "client_phase_demo",
        old.seconds_per_client() * expected,
        new.seconds_per_client() * expected,
        f"{n} clients, q={q}, 96 samples, {rounds} rounds; seconds per round scaled to Nq="
        f"{expected:.1f} sampled clients; new: {clients_per_node} clients per node",
        new.peak_bytes,
    )


def _demo_clients(overrides: list[str]) -> int:
    from popri_flwr.data import load_federation
    from popri_flwr.hydra_config import load_config

    return load_federation(load_config(overrides).data).num_clients


def compare_client_phase_large(
    num_clients: int = 72_000,
    num_samples: int = 18_000,
    clients_per_node: int = 2_000,
    baseline_clients: int = 60,
) -> dict[str, Any]:
    """72,000 clients x 18,000 samples, q = 1, with cohorts; the old path on a subset.

    Two rounds each; the second (warm: client actors started, nodes' data loaded) counts, as
    in a long run. The first round's seconds are in the note.
    """
    emb = unit_rows(np.random.default_rng(5), num_samples)
    new = run_client_phase(
        sample_emb=emb, num_clients=num_clients, clients_per_node=clients_per_node, rounds=2,
        sample_rate=1.0, load_cohort=synthetic_cohorts(num_clients, clients_per_node),
    )  # fmt: skip
    old = run_client_phase(
        sample_emb=emb, num_clients=baseline_clients, clients_per_node=1, rounds=2,
        sample_rate=1.0, load_cohort=synthetic_cohorts(baseline_clients, 1),
    )  # fmt: skip
    scale = num_clients / baseline_clients
    return _row(
        "client_phase_72k",
        old.seconds[1] * scale,
        new.seconds[1],
        f"{num_clients} synthetic clients x {num_samples} samples, q=1, second round; new: "
        f"{clients_per_node} clients per node (first round {new.seconds[0]:.1f} s), peak "
        f"memory {new.peak_bytes / 2**30:.2f} GiB (PSS of all processes); baseline "
        f"EXTRAPOLATED from {baseline_clients} clients on one node each "
        f"({old.seconds[1]:.2f} s x {scale:g})",
        new.peak_bytes,
    )


def _row(measure: str, baseline: float, new: float, note: str, peak: int) -> dict[str, Any]:
    return {
        "measure": measure,
        "baseline_s": round(baseline, 2),
        "new_s": round(new, 2),
        "ratio": round(baseline / new, 2),
        "peak_gib": round(peak / 2**30, 2),
        "note": note,
    }


def in_fresh_process(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``compare_client_phase_NAME(**kwargs)`` in a new Python process; return its row.

    A fresh process, so the peak memory is the client phase's own (not models an earlier row
    loaded into this process) and Ray starts clean.
    """
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "popri_flwr.speed.client_phase", name, json.dumps(kwargs)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.WARNING)
    fn = {"demo": compare_client_phase_demo, "large": compare_client_phase_large}[sys.argv[1]]
    print(json.dumps(fn(**json.loads(sys.argv[2]))))
