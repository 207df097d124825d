"""Which names hold secrets, and which values are secrets: the one filter.

A name is secret when it contains KEY, SECRET, PASSWORD/PASSWD or
CREDENTIAL, or has a word ending in TOKEN (HF_TOKEN, apiToken; not
TOKENIZERS_PARALLELISM or rollout.max_tokens). A value is secret when it is
the value of such a variable in the environment. Profiles, scripts, YAML
copies, logs and MLflow never carry either.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

_ANYWHERE = ("key", "secret", "password", "passwd", "credential")
_MIN_VALUE_LEN = 6  # shorter values ("1", "true") are not worth redacting and would match everywhere
REDACTED = "<redacted>"


def _words(name: str) -> list[str]:
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return [w for w in re.split(r"[^a-z0-9]+", snake) if w]


def looks_secret(name: str) -> bool:
    """True for HF_TOKEN, db.password, aws_secret_access_key, apiKey, WANDB_API_KEY."""
    low = name.lower()
    if any(part in low for part in _ANYWHERE):
        return True
    return any(w.endswith("token") for w in _words(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-named variables in the environment, longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if looks_secret(k) and len(v.strip()) >= _MIN_VALUE_LEN}
    return sorted(found, key=len, reverse=True)


def secret_in(text: str, values: Iterable[str] | None = None) -> str | None:
    """The name-free reason if `text` holds a secret value from the environment, else None."""
    env = os.environ
    for value in secret_values() if values is None else values:
        if value in text:
            names = sorted(k for k, v in env.items() if v == value and looks_secret(k))
            return f"the value of ${names[0]}" if names else "a secret value"
    return None


def redact(text: str, values: Iterable[str] | None = None) -> str:
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return text
