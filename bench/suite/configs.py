"""The tokenguard configs the suite writes: ``bench.toml`` and ``bench8.toml`` (keys whose
limits are never reached, 3 or 8 rules each) and ``accuracy.toml`` (one key with small
limits and a short window). The report's appendix prints them from here too.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.suite.tokenguard_parts import Limits

HUGE = 10**12
TP_SECRETS = tuple(f"sk-bench-tp-{i}" for i in range(8))

# The rules of a key in the throughput configs: 3 (per minute), or 8 as in
# ``python -m bench decisions --rules 8`` (the same rows: per minute, per hour, per day).
THREE_RULES = ("rpm", "input_tpm", "output_tpm")
EIGHT_RULES = (*THREE_RULES, "rph", "input_tph", "output_tph", "rpd", "input_tpd")


def throughput_config(rules: Sequence[str] = THREE_RULES) -> str:
    """``bench.toml``: the throughput keys, each with ``rules`` set out of reach."""
    lines = [
        f"# keys whose limits are never reached (throughput scenarios), {len(rules)} rules each",
        "[window]",
        "seconds = 60",
        "bucket_seconds = 5",
    ]
    for i, secret in enumerate(TP_SECRETS):
        lines += ["", "[[keys]]", f'key = "{secret}"', f'name = "tp-{i}"']
        lines += [f"{rule} = {HUGE}" for rule in rules]
    return "\n".join(lines) + "\n"


ACCURACY_WINDOW = 10
ACCURACY_BUCKET = 1
ACCURACY_LIMITS = Limits(rpm=50, input_tpm=6000, output_tpm=3000, default_max_tokens=64)


def accuracy_config(secret: str) -> str:
    """``accuracy.toml``: one key, ``secret``, with :data:`ACCURACY_LIMITS`."""
    lim = ACCURACY_LIMITS
    return (
        "# accuracy.toml: one key with small limits, a short window so a run spans several\n"
        f"[window]\nseconds = {ACCURACY_WINDOW}\nbucket_seconds = {ACCURACY_BUCKET}\n\n"
        f'[[keys]]\nkey = "{secret}"\nname = "hammer"\nrpm = {lim.rpm}\n'
        f"input_tpm = {lim.input_tpm}\noutput_tpm = {lim.output_tpm}\n"
        f"default_max_tokens = {lim.default_max_tokens}\n"
    )
