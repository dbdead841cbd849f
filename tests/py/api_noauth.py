#!/usr/bin/env python3
"""Every operation of an OpenAPI description answers 401 without
credentials and with a bogus bearer token (issue 18: the REST API requires
authentication). Used by tests/e2e_web.rs; runs with the venv's python
(PyYAML comes with schemathesis).

usage: api_noauth.py OPENAPI.yaml BASE_URL
  BASE_URL: where the description's paths are rooted, e.g.
  https://198.18.19.1:4443/api/v1 (no trailing slash)

Requests with a body carry a minimal valid one (the schema's required
properties), and are sent once more with `{}`: credentials come first.
Prints one JSON line per operation {"method", "path", "none", "bogus",
"body_ok", "empty_body"?} and a last line {"operations": N, "failures": [...]}.
"""
import json
import ssl
import sys
import urllib.error
import urllib.request

import yaml

METHODS = ("get", "post", "put", "patch", "delete")
# Values for path parameters: syntactically plausible, never existing.
PARAM_VALUES = {"address": "198.18.200.200", "user": "nobody", "id": "0"}


def valid_body(op):
    """A minimal body the operation's JSON schema accepts (its required
    properties), or None when it takes no body."""
    content = ((op.get("requestBody") or {}).get("content") or {}).get("application/json")
    if not content:
        return None
    schema = content.get("schema") or {}
    body = {}
    for name in schema.get("required", []):
        prop = (schema.get("properties") or {}).get(name, {})
        if prop.get("type") == "integer":
            body[name] = prop.get("minimum", 1)
        elif name == "address":
            body[name] = PARAM_VALUES["address"]
        else:
            body[name] = "x"
    return body


def call(url, method, headers, body=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    data = None
    if method in ("post", "put", "patch"):
        data = json.dumps(body if body is not None else {}).encode()
    req = urllib.request.Request(url, data=data, method=method.upper(), headers=headers)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, r.read(2000)
    except urllib.error.HTTPError as e:
        return e.code, e.read(2000)


def main():
    spec = yaml.safe_load(open(sys.argv[1]))
    base = sys.argv[2].rstrip("/")
    ops, failures = 0, []
    for path, item in sorted((spec.get("paths") or {}).items()):
        for method in METHODS:
            if method not in (item or {}):
                continue
            ops += 1
            concrete = path
            for name, value in PARAM_VALUES.items():
                concrete = concrete.replace("{%s}" % name, value)
            while "{" in concrete:  # any other parameter
                a = concrete.index("{")
                b = concrete.index("}", a)
                concrete = concrete[:a] + "x" + concrete[b + 1 :]
            body = valid_body(item[method])
            st_none, body_none = call(base + concrete, method, {}, body)
            st_bogus, _ = call(
                base + concrete,
                method,
                {"Authorization": "Bearer igt_bogus0000000000000000"},
                body,
            )
            # A malformed body must not be looked at before the credentials.
            st_empty = None
            if body:
                st_empty, _ = call(base + concrete, method, {}, {})
            try:
                body_ok = "error" in json.loads(body_none)
            except ValueError:
                body_ok = False
            rec = {
                "method": method.upper(),
                "path": path,
                "none": st_none,
                "bogus": st_bogus,
                "body_ok": body_ok,
            }
            if st_empty is not None:
                rec["empty_body"] = st_empty
            print(json.dumps(rec), flush=True)
            if st_none != 401 or st_bogus != 401 or not body_ok or st_empty not in (None, 401):
                failures.append(rec)
    print(json.dumps({"operations": ops, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
