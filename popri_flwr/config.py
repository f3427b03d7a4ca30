"""Typed run configuration: the Hydra tree (``configs/``) mapped onto dataclasses.

Every bad value stops the run before any work with one line that names the key, e.g.
``privacy.sample_rate: must be in (0, 1], got 1.5``. The same tree drives the Hydra entry
point, ``flwr run .`` and deployments, so all three behave the same.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from popri_flwr.algorithms.fedavg_update import FedAvgConfig
from popri_flwr.algorithms.voting import PEConfig
from popri_flwr.data import DataConfig
from popri_flwr.evaluation.downstream import DownstreamConfig
from popri_flwr.models.dpo import DPOStepConfig


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message starts with the key."""


@dataclass
class PrivacyConfig:
    """Client-level (epsilon, delta)-DP over the whole run.

    ``epsilon = inf`` (also written ``.inf``) turns noise off and must be asked for
    explicitly; a number that overflows to infinity (``1e999``) is refused. With
    ``noise_multiplier`` unset, sigma is calibrated so that ``rounds`` rounds of the Poisson
    subsampled Gaussian mechanism at rate ``sample_rate`` spend at most ``epsilon``.
    """

    epsilon: float = 1.0
    delta: float = 1e-5
    sample_rate: float = 0.1
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    #: ``pld`` (privacy loss distributions: tighter, the default) or ``rdp`` (Renyi DP).
    accounting: str = "pld"
    #: Debugging only: seed client sampling and noise so a run can be replayed. Such a run is
    #: NOT differentially private (marked so everywhere) and is refused by the Flower app.
    debug_noise_seed: int | None = None


@dataclass
class GenerationConfig:
    """The server's generator and its sampling parameters (POPri step 2)."""

    model: str = "packaged:smollm2-135m-instruct"
    backend: str = "transformers"
    device: str = "auto"
    #: ``auto``: bf16 where the CPU (avx512_bf16 / amx_bf16) or GPU supports it, else float32;
    #: ``float32`` makes texts independent of ``batch_size`` (bf16 repeats at a fixed one).
    dtype: str = "auto"
    #: Rows (prompt x sample) per decoding batch; each prompt's prefill is shared by its rows.
    batch_size: int = 16
    num_threads: int | None = None
    cache_dir: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 85
    truncate_tokens: int | None = 64


@dataclass
class EmbedderConfig:
    """Sentence embedder used by clients (and by the server in ``payload=embeddings``)."""

    model: str = "packaged:all-minilm-l6-v2"
    device: str = "cpu"
    batch_size: int = 64


@dataclass
class PublicSetConfig:
    """The public initial set the few-shot prompts draw on (never private data)."""

    description: str = "a paragraph from a US presidential State of the Union address"
    path: str | None = None
    size: int = 64
    max_new_tokens: int = 120
    # Zero-shot texts from a small model are more coherent a little below T = 1; these only
    # seed the few-shot prompts (POPri's own samples use generation.temperature).
    temperature: float = 0.7
    top_p: float = 0.95


@dataclass
class StrategyConfig:
    """Method-specific settings; ``name`` picks the strategy (one config key swaps methods).

    POPri uses ``num_prompts`` (K), ``samples_per_prompt`` (J), ``reject_rank`` (r, zero-based),
    ``pairing`` (``rank``: one pair per prompt, best vs rank r, the paper; ``all``: every pair
    of a prompt's samples at least r ranks apart, more pairs from the same release),
    ``shots``, ``prompt_style`` (``list``: the paper's few-shot list to continue; ``chat``: the
    same examples in an instruction, in the generator's chat template, for instruct models) and
    ``payload`` (``embeddings``: the server embeds samples and clients only do a
    matrix product; ``texts``: clients receive and embed the texts themselves) and
    ``replay_rounds`` (DPO also trains on the pairs released in up to this many earlier
    rounds; post-processing, no privacy cost; 0 = the paper). PE and
    DP-FedAvg read their own typed sections, ``pe`` and ``fedavg``.
    """

    name: str = "popri"
    num_prompts: int = 1800
    samples_per_prompt: int = 10
    reject_rank: int = 4
    pairing: str = "rank"
    shots: int = 3
    prompt_style: str = "list"
    payload: str = "embeddings"
    replay_rounds: int = 0
    #: POPri's server update: ``dpo`` (the paper) or ``tilt``: weighted likelihood of each
    #: prompt's ``tilt_keep`` best samples (``None``: all), weights ``softmax(z / tilt_tau)``
    #: of the standardized noisy scores (:mod:`popri_flwr.algorithms.tilt`); the ``dpo``
    #: section's adapter, optimizer, learning rate, steps and micro-batch. Rounds compound:
    #: ``tilt_tau`` ~ the number of rounds adds up to about one ``tau = 1`` tilt.
    update: str = "dpo"
    tilt_tau: float = 3.0
    tilt_keep: int | None = None
    #: Private Evolution's own settings (``strategy=pe``).
    pe: PEConfig = field(default_factory=PEConfig)
    #: DP-FedAvg's local training and server step (``strategy=dp_fedavg``).
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)


@dataclass
class SimulationConfig:
    """Flower simulation engine settings (Ray backend).

    Attributes
    ----------
    num_supernodes
        Simulated nodes (default: as many as the federation needs).
    clients_per_node
        Clients one simulated node serves (a cohort). 1: one node per client (the default).
        Larger cohorts mean fewer messages per round: the server still samples *clients*
        (rate q over the whole population) and checks one clipped row per sampled member.
    client_num_cpus, client_num_gpus
        Resources of one client actor (Flower sizes its actor pool from the cluster's
        resources divided by these).
    round_timeout
        Seconds to wait for a round's replies.
    min_reply_fraction
        Stop the run, before the round's release, when fewer than this share of the sampled
        clients replied (failed nodes, timeouts): a release on a handful of clients spends a
        full round's budget for little signal (Ray does not replace a client actor its memory
        monitor killed, so such failures persist). Nothing of the stopped round is released
        or spent; the same command resumes. 0 = go on with whoever replied. Also read by the
        Flower app (``flwr run``) and deployments.
    init_args
        ``ray.init`` arguments, e.g. ``{address: "HEAD_IP:6379"}`` for an existing cluster.
    """

    num_supernodes: int | None = None
    clients_per_node: int = 1
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    round_timeout: float = 600.0
    min_reply_fraction: float = 0.5
    init_args: dict[str, Any] = field(default_factory=dict)

    def population(self, available: int) -> int:
        """N, the clients the sampling rate refers to, out of ``available`` in the data."""
        if self.num_supernodes is None:
            return available
        n = min(self.num_supernodes * self.clients_per_node, available)
        if self.num_nodes(n) < self.num_supernodes:
            raise ConfigError(
                f"simulation.num_supernodes: {self.num_supernodes} nodes of "
                f"{self.clients_per_node} client(s) need more than the {available} clients of "
                "the federation"
            )
        return n

    def num_nodes(self, population: int) -> int:
        """Simulated nodes for ``population`` clients: ceil(N / clients_per_node)."""
        return -(-int(population) // self.clients_per_node)


@dataclass
class EvaluationConfig:
    """Evaluation-only metrics computed each round on held-out private text."""

    fid: bool = True
    max_eval_texts: int = 2000
    #: POPri diagnostics: this many fixed prompts (x samples_per_prompt), sampled after every
    #: round with the same seeds, so ``fid_probe`` does not move with the prompts (the round's
    #: own are new each round); it still carries FID's sampling noise, whose size the
    #: round's ``fid_probe_change_se`` states (a paired bootstrap over the prompts). 0 = off.
    probe_prompts: int = 0
    #: POPri diagnostics: the generator's own next-token loss and accuracy on this many
    #: held-out private texts (``generator_loss``), after every round. Deterministic given the
    #: generator, so every change is the generator's. 0 = off.
    generator_eval_texts: int = 0
    report_client_seconds: bool = False  # a timing side channel: off unless benchmarking


@dataclass
class RunConfig:
    """Everything one run needs."""

    #: Public randomness only (prompts, generation, DPO, downstream); never the noise.
    seed: int = 0
    rounds: int = 5
    #: None: Hydra's output directory (outputs/DATE/TIME, multirun/DATE/TIME/N).
    run_dir: str | None = None
    #: A run started again on the same run_dir continues where it stopped.
    resume: bool = True
    #: Keep un-noised statistics of the clients in ``diagnostics.jsonl`` (not released).
    #: null: on in simulation (popri-run), off under the Flower app (flwr run, deployments).
    diagnostics: bool | None = None
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    public_set: PublicSetConfig = field(default_factory=PublicSetConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dpo: DPOStepConfig = field(default_factory=DPOStepConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI scalar to the annotated type, or raise a key-named error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_mapping(hint, value, key)
    if origin in (dict, Mapping) or hint in (dict, Any):
        return dict(value) if isinstance(value, Mapping) else value
    if origin is tuple:
        return tuple(value)
    if value is None:
        raise ConfigError(f"{key}: must be set (got null)")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return _to_float(value, key)
        if hint is str:
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}"
        ) from None
    return value


#: Spellings of infinity accepted in configs and on the command line (YAML writes ``.inf``).
INF_SPELLINGS = {"inf", ".inf", "+inf", "+.inf", "infinity", "+infinity"}


def _to_float(value: Any, key: str) -> float:
    """A float from a number or a string; ``inf``/``.inf`` mean infinity, ``1e999`` is refused.

    An infinite epsilon switches privacy off, so it must be written as infinity on purpose,
    never reached by a number that overflows.
    """
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        text = value.strip().lower()
        if text in INF_SPELLINGS:
            return math.inf
        if text in {"-" + t.lstrip("+") for t in INF_SPELLINGS}:
            return -math.inf
        out = float(text)
        if math.isinf(out):
            raise ConfigError(
                f"{key}: {value!r} overflows to infinity; write inf (or .inf) if you mean it"
            )
        return out
    return float(value)


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown key; expected one of {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # sub-configs validate themselves with key-named messages
        msg = str(err)
        raise ConfigError(
            f"{prefix}.{msg}" if prefix and not msg.startswith(prefix) else msg
        ) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (JSON/YAML friendly; inf stays a float)."""
    return dataclasses.asdict(cfg)


def check(cond: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("key: expected, got value")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {expected}, got {value!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check cross-field constraints not covered by the sub-config dataclasses.

    Raises
    ------
    ConfigError
        Naming the first offending key.
    """
    p, s, g = cfg.privacy, cfg.strategy, cfg.generation
    check(cfg.rounds >= 1, "rounds", "must be >= 1", cfg.rounds)
    check(
        not math.isnan(p.epsilon) and p.epsilon > 0,
        "privacy.epsilon",
        "must be > 0 (inf = no privacy, only when asked for)",
        p.epsilon,
    )
    check(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)", p.delta)
    check(0 < p.sample_rate <= 1, "privacy.sample_rate", "must be in (0, 1]", p.sample_rate)
    check(
        p.clip_norm > 0 and math.isfinite(p.clip_norm),
        "privacy.clip_norm",
        "must be a finite number > 0",
        p.clip_norm,
    )
    check(
        p.accounting in ("pld", "rdp"),
        "privacy.accounting",
        "expected one of ['pld', 'rdp']",
        p.accounting,
    )
    if p.noise_multiplier is not None:
        check(
            p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0", p.noise_multiplier
        )
    from popri_flwr.strategies import STRATEGIES, strategy_class

    check(s.name in STRATEGIES, "strategy.name", f"expected one of {sorted(STRATEGIES)}", s.name)
    hook = getattr(strategy_class(s.name), "validate_config", None)
    if hook is not None:  # each method checks its own keys
        try:
            hook(cfg)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    check(
        g.backend in ("transformers", "vllm"),
        "generation.backend",
        "expected transformers or vllm",
        g.backend,
    )
    check(g.batch_size >= 1, "generation.batch_size", "must be >= 1", g.batch_size)
    check(
        g.dtype in ("auto", "float32", "bfloat16"),
        "generation.dtype",
        "expected auto, float32 or bfloat16",
        g.dtype,
    )
    check(
        cfg.evaluation.probe_prompts >= 0,
        "evaluation.probe_prompts",
        "must be >= 0 (0 = off)",
        cfg.evaluation.probe_prompts,
    )
    check(
        cfg.evaluation.generator_eval_texts >= 0,
        "evaluation.generator_eval_texts",
        "must be >= 0 (0 = off)",
        cfg.evaluation.generator_eval_texts,
    )
    check(
        cfg.simulation.client_num_cpus > 0,
        "simulation.client_num_cpus",
        "must be > 0",
        cfg.simulation.client_num_cpus,
    )
    check(
        0.0 <= cfg.simulation.min_reply_fraction <= 1.0,
        "simulation.min_reply_fraction",
        "must be in [0, 1]",
        cfg.simulation.min_reply_fraction,
    )
    check(
        cfg.simulation.clients_per_node >= 1,
        "simulation.clients_per_node",
        "must be >= 1",
        cfg.simulation.clients_per_node,
    )
    return cfg


def load_run_config(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a (Hydra/OmegaConf-resolved) mapping."""
    return validate(from_mapping(RunConfig, data))
