"""DP-FedAvg's client: train the downstream LM locally, return the clipped update.

What leaves the client is exactly one vector: ``clip_C(w_local - w_global)`` over the trainable
parameters (the whole model, or the LoRA adapter), with C the clip norm the server sent. Nothing
else (not the number of texts, not the loss) is reported.

Why not Flower's ``fixedclipping_mod``: it expects the reply to be the full new parameters
under the keys that were sent and clips ``reply - sent`` with ``clip_inputs_inplace``. Our
protocol replies with the update itself as one flat vector, which the server re-checks
(length, finite, norm <= C) like every other method's vector; the clipping is the same FlatClip
rule (:func:`popri_flwr.privacy.clipping.clip_to_norm`, tested against Flower's), computed in
float64 and safe for a zero update (Flower's divides by the norm).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

import numpy as np
from flwr.app import Message

from popri_flwr.algorithms.fedavg_update import (
    FedAvgConfig,
    build_fedavg_model,
    frozen_fingerprint,
    load_param_arrays,
    local_train,
)
from popri_flwr.client_apps import resources
from popri_flwr.evaluation.downstream import DownstreamConfig, bf16_for, load_tokenizer
from popri_flwr.privacy.clipping import clip_to_norm
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG

logger = logging.getLogger(__name__)

#: One model per process: (key, model, tokenizer, fingerprint of the frozen base).
_MODEL: dict[str, Any] = {}


def _model_for(downstream: DownstreamConfig, fedavg: FedAvgConfig) -> tuple[Any, Any, str]:
    """The client's copy of the model (built once per process; trainable weights reloaded)."""
    key = json.dumps(
        [asdict(downstream), fedavg.train_mode, fedavg.lora_r, fedavg.lora_alpha],
        default=str,
        sort_keys=True,
    )
    if _MODEL.get("key") != key:
        tokenizer = load_tokenizer(downstream)
        model = build_fedavg_model(downstream, tokenizer, fedavg)
        _MODEL.update(key=key, model=model, tokenizer=tokenizer, fp=frozen_fingerprint(model))
    return _MODEL["model"], _MODEL["tokenizer"], _MODEL["fp"]


def client_seed(seed: int, server_round: int, node_key: str) -> int:
    """A distinct, reproducible torch seed per (run seed, round, client)."""
    digest = int.from_bytes(hashlib.sha256(node_key.encode()).digest()[:8], "little")
    return int(np.random.SeedSequence([seed, server_round, digest]).generate_state(1)[0])


def fedavg_config_from_message(config: Any) -> FedAvgConfig:
    """The local-training settings the server sent (``strategy.fedavg`` on the server)."""
    epochs = config.get("local-epochs")
    return FedAvgConfig(
        local_steps=int(config["local-steps"]),
        local_epochs=None if epochs is None else float(epochs),
        local_lr=float(config["local-lr"]),
        local_batch_size=int(config["local-batch-size"]),
        local_optimizer=str(config["local-optimizer"]),
        train_mode=str(config["train-mode"]),
        lora_r=int(config["lora-r"]),
        lora_alpha=float(config["lora-alpha"]),
    )


def downstream_config_from_message(config: Any) -> DownstreamConfig:
    """The downstream model the server trains (sent with every round), on this CPU."""
    fields = json.loads(str(config["downstream"]))
    # Simulated clients get no GPU; the update must not depend on the server's device setting.
    return DownstreamConfig(**{**fields, "device": "cpu"})


def train_update(msg: Message, node: resources.NodeData) -> np.ndarray:
    """Return this client's clipped model update for the global parameters in ``msg``."""
    config = msg.content[PAYLOAD_CONFIG]
    clip_norm = float(config["clip-norm"])
    fedavg = fedavg_config_from_message(config)
    downstream = downstream_config_from_message(config)
    model, tokenizer, fingerprint = _model_for(downstream, fedavg)
    if fingerprint != config["base-fingerprint"]:
        raise ValueError(
            "downstream: this client's frozen base model differs from the server's; both must "
            "use the same downstream settings (model, size, seed, tokenizer)"
        )
    arrays = {name: arr.numpy() for name, arr in msg.content[PAYLOAD_ARRAYS].items()}
    load_param_arrays(model, arrays)
    update = local_train(
        model,
        node.texts,
        tokenizer,
        steps=fedavg.local_steps,
        epochs=fedavg.local_epochs,
        lr=fedavg.local_lr,
        batch_size=fedavg.local_batch_size,
        seq_len=int(config["seq-len"]),
        seed=client_seed(int(config["seed"]), int(config["server-round"]), node.key),
        optimizer=fedavg.local_optimizer,
        bf16=bf16_for(downstream, "cpu"),
    )
    if update.size != int(config["vector-length"]):
        raise ValueError(
            f"downstream: this client's model has {update.size} trainable parameters, the "
            f"server expects {config['vector-length']}"
        )
    return clip_to_norm(update, clip_norm)
