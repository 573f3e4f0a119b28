"""Credentials out of everything the project prints or writes: stdout and stderr, config.yaml, a checkpoint's saved
config, the tracking state file, MLflow params, tags and artifacts. The secret itself is replaced by `***`; what
it belongs to stays readable (`http://user:***@host:5000`), so a user sees which URI or command is meant. Nothing
redacted is ever read back as a credential: a resumed run, or an upload, takes it again from its command line or
the environment (MLflow also reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).

    redact("http://bob:pw@host:5000")            -> "http://bob:***@host:5000"
    redact("pipe:curl -u bob:pw https://h/a.tar") -> "pipe:curl -u bob:*** https://h/a.tar"
    redact_tree(config_dict)                     # every string inside dicts, lists and tuples
    is_redacted(uri)                             # True when `uri` lost a secret here (it cannot be used as is)

What counts as a secret:
- the password of a URI's user info (`scheme://user:PASSWORD@host`);
- query parameters named like a secret (token, secret, password, signature, sig, key, credential, auth ...),
  e.g. a presigned URL's `X-Amz-Signature=...`;
- in a command (`pipe:` data URLs): `-u/--user USER:PASSWORD`, `--password X` and other options named like a
  secret, an `Authorization:` header's value, `NAME=VALUE` assignments whose NAME is secret-like
  (`AWS_SECRET_ACCESS_KEY=...`);
- the value of any environment variable whose name is secret-like (so that an `${oc.env:...}` interpolation, or a
  library message quoting it, is caught too).
"""
from __future__ import annotations

import os
import re

MASK = "***"

_SECRET_WORD = r"(?:password|passwd|pwd|pass|secret|token|signature|sig|credential|credentials|auth|api[_-]?key" \
               r"|access[_-]?key|private[_-]?key|key)"
_NAMED = rf"(?:[A-Za-z0-9]+[-_])*{_SECRET_WORD}(?:[-_][A-Za-z0-9]+)*"  # a name one of whose parts is a secret word
_ENV_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY|_AUTH)", re.I)

_RULES = [
    # scheme://user:password@host
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@'\"]+:)([^/\s@'\"]+)(@)"), rf"\g<1>{MASK}\g<3>"),
    # ?token=... &X-Amz-Signature=... (any parameter whose name contains a secret word)
    (re.compile(rf"([?&;]{_NAMED}=)([^&\s'\"]+)", re.I), rf"\g<1>{MASK}"),
    # curl -u user:password / --user user:password
    (re.compile(r"((?:^|\s)(?:-u|--user|--proxy-user)\s*['\"]?[^\s:'\"]+:)([^\s'\"]+)"), rf"\g<1>{MASK}"),
    # --password X, --password=X, --token X, --aws-secret-access-key X
    (re.compile(rf"((?:^|\s)--?{_NAMED}(?:\s+|=)['\"]?)([^\s'\"]+)", re.I), rf"\g<1>{MASK}"),
    # Authorization: Bearer X / Basic X
    (re.compile(r"(Authorization:\s*(?:Bearer\s+|Basic\s+|Token\s+)?)([^\s'\"]+)", re.I), rf"\g<1>{MASK}"),
    # AWS_SECRET_ACCESS_KEY=... in a command
    (re.compile(r"((?:^|[\s;:])[A-Za-z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_KEY|ACCESS_KEY)"
                r"[A-Za-z0-9_]*=)([^\s'\"&]+)", re.I), rf"\g<1>{MASK}"),
]


def _env_secrets() -> list[str]:
    """Values of environment variables whose names are secret-like, longest first (4 characters or more)."""
    values = {v for k, v in os.environ.items() if _ENV_NAME.search(k) and len(v) >= 4}
    return sorted(values, key=len, reverse=True)


def redact(text):
    """`text` with every credential replaced by ***; anything that is not a str comes back as it is."""
    if not isinstance(text, str) or not text:
        return text
    for value in _env_secrets():
        text = text.replace(value, MASK)
    for rule, repl in _RULES:
        text = rule.sub(repl, text)
    return text


def redact_tree(obj):
    """A copy of `obj` (dicts, lists, tuples of plain values) with every string redacted."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return redact(obj)


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without `user:password@`, user, password); (uri, None, None) when it has no password."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/\s:@]+):([^/\s@]+)@(.*)$", uri or "")
    if not m:
        return uri, None, None
    from urllib.parse import unquote
    return m.group(1) + m.group(4), unquote(m.group(2)), unquote(m.group(3))


def is_redacted(text) -> bool:
    """True when `text` carries a redacted secret (it was stored without its credential)."""
    return isinstance(text, str) and MASK in text


def same_but_secrets(a, b) -> bool:
    """True when `a` and `b` are equal once both are redacted (a saved value against the one given now)."""
    return redact_tree(a) == redact_tree(b)
