"""The client side on its own: no server code, each node's own data, the reply format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from fakegrid import set_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from popri_flwr.algorithms.scoring import client_score_vector
from popri_flwr.client_apps.app import client_id, make_client_app
from popri_flwr.models.embedding import DEFAULT_EMBEDDER, get_embedder
from popri_flwr.privacy.clipping import l2_norm
from popri_flwr.protocol import REPLY_ARRAYS, REPLY_VECTOR


def test_the_client_app_imports_no_server_code():
    code = (
        "import sys, popri_flwr.client_apps; "
        "assert not any(m.startswith('flwr') for m in sys.modules), 'package pulls in flwr'; "
        "import popri_flwr.client_apps.app; "
        "bad = [m for m in sys.modules if m.startswith(('popri_flwr.strategies', "
        "'popri_flwr.server_app', 'popri_flwr.simulation', 'popri_flwr.models.dpo', "
        "'popri_flwr.models.generation'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _context(node_config, node_id=1):
    return Context(
        run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


def _score_message(emb):
    set_task_identity()
    config = {
        "method": "popri",
        "clip-norm": 0.5,
        "vector-length": len(emb),
        "embedder": DEFAULT_EMBEDDER,
        "payload": "embeddings",
    }
    return Message(
        RecordDict(
            {"config": ConfigRecord(config), "payload": ArrayRecord({"embeddings": Array(emb)})}
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


def test_a_supernode_reads_its_own_data_file(tmp_path):
    own = ["The budget is balanced and taxes are low.", "Our navy guards the seas."]
    path = tmp_path / "node0.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in own))
    embedder = get_embedder(DEFAULT_EMBEDDER, "cpu")
    samples = embedder.embed(["Taxes were cut.", "Ships sailed.", "A poem about cats."])
    app = make_client_app()
    context = _context({"data-path": str(path)})
    reply = app(_score_message(samples), context)
    assert set(reply.content.keys()) == {REPLY_ARRAYS}
    vec = reply.content[REPLY_ARRAYS][REPLY_VECTOR].numpy()
    expected = client_score_vector(samples, embedder.embed(own), 0.5)
    np.testing.assert_allclose(vec, expected, rtol=1e-5, atol=1e-6)
    assert l2_norm(vec) <= 0.5
    assert client_id(context) == f"file:{path}"


def test_a_load_texts_function_gives_the_nodes_texts():
    seen = []

    def my_texts(context):
        seen.append(context.node_id)
        return [f"Private text of node {context.node_id} about schools."]

    embedder = get_embedder(DEFAULT_EMBEDDER, "cpu")
    samples = embedder.embed(["Schools matter.", "War and peace."])
    app = make_client_app(my_texts)
    vec = app(_score_message(samples), _context({}, node_id=7)).content[REPLY_ARRAYS]
    expected = client_score_vector(samples, embedder.embed([my_texts(_context({}, 7))[0]]), 0.5)
    np.testing.assert_allclose(vec[REPLY_VECTOR].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert seen[0] == 7


def test_identity_names_the_client():
    assert client_id(_context({"partition-id": 3, "num-partitions": 5})) == "partition-3"
    assert client_id(_context({"client-id": "alice", "partition-id": 3})) == "alice"


def _members_message(emb, members):
    msg = _score_message(emb)
    msg.content["config"]["members"] = list(members)
    return msg


def test_a_cohort_node_answers_one_row_per_sampled_member():
    from popri_flwr.client_apps import resources
    from popri_flwr.config import RunConfig

    cfg = RunConfig()
    cfg.data.max_clients, cfg.data.max_texts_per_client = 8, 3
    cfg.simulation.clients_per_node = 3  # 8 clients: nodes of 3, 3 and 2
    app = make_client_app(config=cfg)
    embedder = get_embedder(DEFAULT_EMBEDDER, "cpu")
    samples = embedder.embed(["Taxes were cut.", "Ships sailed.", "A poem.", "The union."])
    identity = app(
        Message(
            RecordDict({"config": ConfigRecord({"identity": True})}),
            dst_node_id=2,
            message_type=MessageType.QUERY,
        ),
        _context({"partition-id": 2, "num-partitions": 3}),
    )
    assert list(identity.content["config"]["client-ids"]) == ["partition-6", "partition-7"]
    reply = app(_members_message(samples, [2, 0]), _context({"partition-id": 1}))
    rows = reply.content[REPLY_ARRAYS][REPLY_VECTOR].numpy()
    assert rows.shape == (2, len(samples))
    for row, client in zip(rows, (5, 3), strict=True):  # members 2 and 0 of node 1
        texts = resources.client_texts(cfg.data, client)
        expected = client_score_vector(samples, embedder.embed(texts), 0.5)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)
        assert l2_norm(row) <= 0.5


def test_a_silo_serves_its_users_through_load_cohort():
    users = {
        "alice": ["Taxes must fall and the budget must balance."],
        "bob": ["The navy patrols the seas.", "Ships and sailors."],
    }
    app = make_client_app(load_cohort=lambda context: users)
    embedder = get_embedder(DEFAULT_EMBEDDER, "cpu")
    samples = embedder.embed(["Taxes were cut.", "Ships sailed.", "A poem about cats."])
    query = Message(
        RecordDict({"config": ConfigRecord({"identity": True})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    ids = app(query, _context({}, node_id=9)).content["config"]["client-ids"]
    assert list(ids) == ["alice", "bob"]
    rows = app(_members_message(samples, [1]), _context({}, node_id=9)).content[REPLY_ARRAYS]
    expected = client_score_vector(samples, embedder.embed(users["bob"]), 0.5)
    np.testing.assert_allclose(rows[REPLY_VECTOR].numpy()[0], expected, rtol=1e-4, atol=1e-5)
    try:
        app(_members_message(samples, [2]), _context({}, node_id=9))
    except ValueError as err:
        assert "index 2 out of range for a node serving 2 clients" in str(err)
    else:
        raise AssertionError("an unknown member index must be refused")
