"""The OpenAPI document's security scheme, and `/docs`: a page rendered here from that document.

FastAPI's own /docs and /redoc load Swagger UI / ReDoc from a CDN, so they are blank on a machine
without internet access; this page is plain HTML with no scripts and no outside assets.
"""

from __future__ import annotations

import html
import re

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

_KEYLESS = re.compile(r"/v1/images/\{[^}]+\}/content")  # the random id is the capability
_METHODS = ("get", "head", "post", "put", "patch", "delete")
_STYLE = ("body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
          "code{background:#f2f2f2;padding:0 .2em}table{border-collapse:collapse;margin:.4rem 0 1rem}"
          "td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;vertical-align:top}"
          "h2{margin-top:2rem;font-size:1.1rem}")


def install_openapi_security(app: FastAPI, secured: bool) -> None:
    """Declare the bearer key on the /v1/ operations that need it (when the server has a key)."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # FastAPI builds it once and caches it on the app
        if secured and "bearerAuth" not in schema.get("components", {}).get("securitySchemes", {}):
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearerAuth"] = {"type": "http", "scheme": "bearer",
                                     "description": "the server's --api-key, as 'Authorization: Bearer KEY'"}
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/") and not _KEYLESS.fullmatch(path):
                    for operation in operations.values():
                        operation["security"] = [{"bearerAuth": []}]
        return schema

    app.openapi = openapi


def docs_page(app: FastAPI) -> HTMLResponse:
    """Every operation of the OpenAPI document: summary, request fields, answers."""
    schema = app.openapi()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(schema['info']['title'])} API"
             f"</title><style>{_STYLE}</style></head><body><h1>{_e(schema['info']['title'])} "
             f"{_e(schema['info']['version'])}</h1><p>{_e(schema['info'].get('description', ''))} "
             "The machine-readable document is <a href='openapi.json'><code>/openapi.json</code></a>.</p>"]
    for path, operations in schema["paths"].items():
        for method in _METHODS:
            if method in operations:
                parts.append(_operation(method, path, operations[method], schema))
    parts.append("</body></html>")
    return HTMLResponse("".join(parts))


def _operation(method: str, path: str, op: dict, schema: dict) -> str:
    out = [f"<h2><code>{method.upper()} {_e(path)}</code></h2>"]
    if text := op.get("summary") or op.get("description"):
        out.append(f"<p>{_e(text)}</p>")
    if op.get("security"):
        out.append("<p>Needs <code>Authorization: Bearer KEY</code>.</p>")
    for media, body in op.get("requestBody", {}).get("content", {}).items():
        fields = _properties(body.get("schema", {}), schema)
        if fields:
            rows = "".join(f"<tr><td><code>{_e(name)}</code></td><td>{_e(_type(prop))}</td>"
                           f"<td>{_e(prop.get('description', ''))}</td></tr>" for name, prop in fields.items())
            out.append(f"<p>Body ({_e(media)}):</p><table><tr><th>field</th><th>type</th><th>meaning</th>"
                       f"</tr>{rows}</table>")
    answers = ", ".join(f"{_e(code)} {_e(r.get('description', ''))}" for code, r in op.get("responses", {}).items())
    out.append(f"<p>Answers: {answers}</p>")
    return "".join(out)


def _properties(body: dict, schema: dict) -> dict:
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    return body.get("properties", {})


def _type(prop: dict) -> str:
    if "enum" in prop:
        return " | ".join(map(str, prop["enum"]))
    if "anyOf" in prop:
        return " | ".join(_type(p) for p in prop["anyOf"] if p.get("type") != "null")
    if prop.get("type") == "array":
        return f"array of {_type(prop.get('items', {}))}"
    kind = prop.get("type", "any")
    return f"{kind} ({prop['pattern']})" if "pattern" in prop else kind


def _e(value) -> str:
    return html.escape(str(value))
