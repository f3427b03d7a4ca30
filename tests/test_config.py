"""Bad configuration stops before any work, with one line naming the key."""

import math
import os
import subprocess
import sys

import pytest
from conftest import FIXTURES

from popri_flwr.config import ConfigError
from popri_flwr.hydra_config import config_from_run_config, load_config


def test_defaults_and_demo_compose():
    cfg = load_config(["experiment=demo"])
    assert cfg.strategy.name == "popri" and cfg.strategy.samples_per_prompt == 6
    assert cfg.data.source == "sotu" and cfg.privacy.epsilon == 1.0
    assert cfg.privacy.delta == pytest.approx(1e-5)


def test_paragraphs_experiment_is_the_demo_at_federation_scale():
    demo, cfg = load_config(["experiment=demo"]), load_config(["experiment=paragraphs"])
    assert (cfg.rounds, cfg.strategy.samples_per_prompt, cfg.privacy.epsilon) == (
        demo.rounds, demo.strategy.samples_per_prompt, demo.privacy.epsilon
    )  # fmt: skip
    assert cfg.data.client_key == "paragraph" and cfg.privacy.sample_rate == 1.0
    assert cfg.strategy.num_prompts == 256 and cfg.public_set.size == 128
    assert cfg.dpo.learning_rate == pytest.approx(3e-4) and cfg.dpo.steps_per_round == 4
    assert cfg.evaluation.generator_eval_texts == 200
    assert cfg.strategy.update == "tilt" and cfg.strategy.tilt_keep is None  # stop 25


def test_tilt_keeps_every_sample_unless_told():
    cfg = load_config(["strategy.update=tilt"])
    assert cfg.strategy.tilt_keep is None and cfg.strategy.tilt_tau == 3.0  # ~ rounds: stop 25
    cfg = load_config(["strategy.update=tilt", "strategy.tilt_keep=2", "strategy.tilt_tau=1"])
    assert (cfg.strategy.tilt_keep, cfg.strategy.tilt_tau) == (2, 1.0)
    again = load_config(["strategy.tilt_keep=2", "strategy.tilt_keep=null"])
    assert again.strategy.tilt_keep is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.sample_rate=1.5", "privacy.sample_rate"),
        ("privacy.sample_rate=0", "privacy.sample_rate"),
        ("privacy.epsilon=-1", "privacy.epsilon"),
        ("privacy.delta=2", "privacy.delta"),
        ("strategy.reject_rank=10", "strategy.reject_rank"),
        ("strategy.payload=weights", "strategy.payload"),
        ("strategy.pairing=best", "strategy.pairing"),
        ("strategy.prompt_style=instruct", "strategy.prompt_style"),
        ("strategy.name=nope", "strategy.name"),
        ("generation.backend=tgi", "generation.backend"),
        ("data.source=s3", "data.source"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
        ("rounds=zero", "rounds"),
        ("+privacy.epsilom=1", "privacy.epsilom"),
        ("dpo.beta=-0.1", "dpo.beta"),
        ("evaluation.probe_prompts=-1", "evaluation.probe_prompts"),
        ("evaluation.generator_eval_texts=-5", "evaluation.generator_eval_texts"),
        ("strategy.update=sft", "strategy.update"),
        ("strategy.tilt_tau=0", "strategy.tilt_tau"),
        ("strategy.tilt_keep=0", "strategy.tilt_keep"),
        ("simulation.min_reply_fraction=2", "simulation.min_reply_fraction"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value).startswith(key), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["dpo.loss_type", "dpo.lora_target_modules"])
def test_a_list_key_given_one_word_says_a_list_is_expected(key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected a list, e.g. \[a,b\], got 'sft'$"):
        load_config([f"{key}=sft"])


def test_dpo_loss_terms_compose():
    cfg = load_config(["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1,0.5]"])
    assert (cfg.dpo.loss_type, cfg.dpo.loss_weights) == (("sigmoid", "sft"), (1.0, 0.5))
    with pytest.raises(ConfigError, match=r"^dpo.loss_weights: .*one weight"):
        load_config(["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1]"])


def test_chat_prompts_need_a_description():
    assert load_config(["strategy.prompt_style=chat"]).strategy.prompt_style == "chat"
    with pytest.raises(ConfigError, match="^public_set.description: must be set for strategy"):
        load_config(["strategy.prompt_style=chat", "public_set.description=' '"])


@pytest.mark.parametrize("spelling", ["inf", ".inf", "Infinity", "+inf", "'.inf'"])
def test_epsilon_inf_only_when_asked(spelling):
    assert math.isinf(load_config([f"privacy.epsilon={spelling}"]).privacy.epsilon)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "'1e400'"])
def test_a_number_that_overflows_to_infinity_is_refused(number):
    with pytest.raises(ConfigError, match="privacy.epsilon: .* overflows to infinity"):
        load_config([f"privacy.epsilon={number}"])
    with pytest.raises(ConfigError, match="overflows to infinity"):  # the flwr run path too
        config_from_run_config({"overrides": f"privacy.epsilon={number}"})


def test_accounting_and_debug_seed_keys():
    cfg = load_config([])
    assert cfg.privacy.accounting == "pld" and cfg.privacy.debug_noise_seed is None
    assert cfg.diagnostics is None  # resolved by the entry point: simulation on, deploy off
    with pytest.raises(ConfigError, match="^privacy.accounting: expected one of"):
        load_config(["privacy.accounting=gdp"])


def test_the_flower_app_refuses_seeded_noise(tmp_path):
    from flwr.app import Context, RecordDict

    from popri_flwr.server_app import main as server_app_main  # what @app.main() runs

    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={
            "experiment": "demo",
            "overrides": "privacy.debug_noise_seed=3",
            "output-dir": str(tmp_path / "run"),
        },
    )
    with pytest.raises(ConfigError, match="privacy.debug_noise_seed: refused by the Flower app"):
        server_app_main(None, context)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_flower_run_config_maps_onto_overrides(tmp_path):
    cfg = config_from_run_config(
        {
            "experiment": "demo",
            "overrides": "privacy.epsilon=7 strategy.num_prompts=5",
            "num-server-rounds": 2,
            "output-dir": str(tmp_path),
        }
    )
    assert (cfg.rounds, cfg.privacy.epsilon, cfg.strategy.num_prompts) == (2, 7.0, 5)
    assert cfg.run_dir == str(tmp_path)


@pytest.mark.parametrize(
    "args, key",
    [
        (["privacy.sample_rate=1.5"], "privacy.sample_rate"),
        (["data.source=file", "data.path=/nonexistent/x.csv"], "/nonexistent/x.csv"),
        (
            ["data.source=file", f"data.path={FIXTURES / 'texts.csv'}", "data.text_column=body"],
            "data.text_column",
        ),
        (["generation.model=/nonexistent/model-dir"], "generation.model"),
        (["run_dir=/proc/popri-cannot-write-here"], "run_dir"),
        (["privacy.epsilon=1e999"], "privacy.epsilon"),
    ],
)
def test_cli_stops_with_one_line_before_any_work(args, key, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not any(a.startswith("run_dir=") for a in args):
        args = [*args, f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "popri_flwr.cli.run", "experiment=demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("popri-run: error:")]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "rounds.jsonl").exists()
