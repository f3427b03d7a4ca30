"""The tiny POPri run shared by the end-to-end tests: real models, smallest sizes."""

#: Hydra overrides: 12 SOTU clients, q = 0.5, 3 prompts x 3 samples, 16 new tokens.
TINY = [
    "experiment=demo",
    "data.max_clients=12",
    "privacy.sample_rate=0.5",
    "privacy.noise_multiplier=2.0",
    "privacy.epsilon=50",
    "strategy.num_prompts=3",
    "strategy.samples_per_prompt=3",
    "strategy.reject_rank=1",
    "public_set.size=4",
    "public_set.max_new_tokens=32",
    "generation.max_new_tokens=16",
    "generation.truncate_tokens=12",
    "dpo.per_device_batch_size=3",
    "evaluation.max_eval_texts=50",
]


def at_sample_rate(overrides: list[str], sample_rate: float) -> list[str]:
    """``overrides`` at another Poisson sampling rate. Sampling is secret (OS entropy), so a
    test that needs replies takes a rate at which a round sampling no one is negligible."""
    kept = [o for o in overrides if not o.startswith("privacy.sample_rate=")]
    return [*kept, f"privacy.sample_rate={sample_rate}"]
