"""The OpenAPI 3.1 description of the service (``GET /openapi.json``), written out by hand.

The service validates requests itself (with the CLI's messages), so this document is the
contract, not generated from code: a test checks that every route of the app is described here.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "malformed request (body is not JSON)", 401: "no bearer token", 403: "wrong token, or the "
            "service is read-only (started without a token)", 404: "unknown model, architecture or query",
            413: "body larger than --max-body", 422: "request or file refused (the message names the field, "
            "and for files the line)", 503: "a first predictor is training (see Retry-After) or the database "
            "cannot be reached"}
    return {str(c): _json(_ERROR, text[c]) for c in codes}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}


_MODEL = _param("model", "path", {"type": "string"}, "registered name, path or hub id of the base model")
_WRITE = [{"bearer": []}]

QUERY_REQUEST = {
    "type": "object", "required": ["model", "params"], "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "description": "base model (registered name, path or hub id)"},
        "params": {"oneOf": [{"type": "string"}, {"type": "integer"}],
                   "description": "size target: 5B, 550M, 5.2e9, 80% (of the base) or an integer", "examples": ["80%"]},
        "tolerance": {"oneOf": [{"type": "string"}, {"type": "number"}], "default": "2%",
                      "description": "results lie in [target * (1 - tol), target]"},
        "objectives": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                       "default": ["ppl_wikitext2"], "description": "metrics to optimise (ppl_* minimised, mmlu maximised)"},
        "top": {"type": "integer", "minimum": 1, "maximum": 200, "default": 10},
        "seed": {"type": "integer", "default": 0},
        "explain": {"type": "boolean", "default": False},
        "allow_drop": {"type": "boolean", "default": False, "description": "the search may drop whole decoder layers"},
    },
}

QUERY_DOC = {
    "type": "object", "description": "archopt.query/1 (what `archopt query --json` prints)",
    "required": ["schema", "query_id", "model", "target_params", "served_from_store", "predictor_versions",
                 "results", "elapsed_ms"],
    "properties": {
        "schema": {"const": "archopt.query/1"}, "query_id": {"type": "integer"}, "model": {"type": "string"},
        "target_params": {"type": "integer"}, "tolerance": {"type": "number"},
        "window": {"type": "array", "items": {"type": "integer"}}, "objectives": {"type": "array"},
        "served_from_store": {"type": "boolean"},
        "predictor_versions": {"type": "object", "additionalProperties": {"type": "integer"}},
        "predictor_protocols": {"type": "object", "additionalProperties": {"type": "integer"}},
        "predictors_stale": {"type": "object", "additionalProperties": {"type": "boolean"},
                             "description": "true: the archive has data this predictor version has not seen; "
                                            "the service retrains it in the background"},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "rank": {"type": "integer"}, "arch_id": {"type": "string"}, "params": {"type": "integer"},
            "fraction": {"type": "number"}, "predicted": {"type": "object"}, "uncertainty": {"type": "object"},
            "measured": {"type": "object"}, "measured_protocol": {"type": "object"},
            "sketch": {"type": "string"},
            "same_sketch_as": {"type": ["integer", "null"],
                               "description": "the rank of the first row with the same sketch"},
            "sketch_note": {"type": ["string", "null"], "description": "where this row differs from that one"},
            "layers": {"type": "array", "items": {"$ref": "#/components/schemas/Layer"}}}}},
        "predictor_quality": {"type": "object", "description": "per objective, the predictor's cross-validated "
                              "quality: training rows, out-of-fold Kendall tau and R², and the share of "
                              "held-out measurements inside predicted ± uncertainty (nominal 0.683)",
                              "additionalProperties": {"type": "object", "properties": {
                                  "rows": {"type": "integer"}, "kendall_tau": {"type": ["number", "null"]},
                                  "r2": {"type": ["number", "null"]}, "coverage": {"type": ["number", "null"]},
                                  "algorithm": {"type": "string"}}}},
        "base_measured": {"type": "object", "additionalProperties": {"type": ["number", "null"]},
                          "description": "the unpruned base model's measured value of each objective"},
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "one line each: a weak or borrowed predictor, a target outside the measured "
                                    "sizes, results predicted better than the base; each names the fixing command"},
        "elapsed_ms": {"type": "number"},
    },
}

LAYER = {"type": "object", "properties": {"layer": {"type": "integer"}, "q_heads": {"type": "integer"},
                                          "kv_heads": {"type": "integer"}, "intermediate": {"type": "integer"},
                                          "dropped": {"type": "boolean"}}}

ARCHS_DOC = {
    "type": "object", "description": "archopt.archs/1 (what `archopt archs --json` prints)",
    "properties": {"schema": {"const": "archopt.archs/1"}, "model": {"type": "string"},
                   "metrics": {"type": "array", "items": {"type": "string"}},
                   "archs": {"type": "array", "items": {"type": "object", "properties": {
                       "arch_id": {"type": "string"}, "params": {"type": "integer"}, "fraction": {"type": "number"},
                       "origin": {"type": "string"},
                       "layers": {"type": "array", "items": {"$ref": "#/components/schemas/Layer"}},
                       "metrics": {"type": "object"}}}}},
}


def openapi_document(version: str) -> dict[str, Any]:
    obj = {"type": "object"}
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "The web page (Pareto front, ranked table, per-layer strip)",
                      "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
        "/healthz": {"get": {"summary": "Liveness and archive schema version",
                             "responses": {"200": _json(obj, "ok"), **_errors(503)}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json(obj, "OpenAPI 3.1")}}},
        "/v1/models": {"get": {"summary": "Base models with shape and counts (archopt.models/1, `archopt models --json`)",
                               "responses": {"200": _json(obj, "archopt.models/1")}}},
        "/v1/models/{model}": {"get": {
            "summary": "One base model with its measured metrics and default protocols (archopt.model/1)",
            "parameters": [_MODEL], "responses": {"200": _json(obj, "archopt.model/1"), **_errors(404)}}},
        "/v1/models/{model}/archs": {"get": {
            "summary": "Architectures of a model with their metrics (`archopt archs --json`)",
            "parameters": [_MODEL,
                           _param("sort", "query", {"type": "string"}, "best-first by this metric"),
                           _param("protocol", "query", {"type": "integer"}, "protocol id for sort"),
                           _param("limit", "query", {"type": "integer", "minimum": 1}, "at most this many"),
                           _param("offset", "query", {"type": "integer", "minimum": 0}, "skip this many")],
            "responses": {"200": _json(ARCHS_DOC, "archopt.archs/1"), **_errors(404, 422)}}},
        "/v1/archs/{arch_id}": {"get": {
            "summary": "One architecture: layers, metrics, every measured value (`archopt show --json`)",
            "parameters": [_param("arch_id", "path", {"type": "string"}, "id or unique prefix of 8+ hex characters"),
                           _param("model", "query", {"type": "string"}, "base model, if the prefix is ambiguous")],
            "responses": {"200": _json(obj, "architecture"), **_errors(404)}}},
        "/v1/query": {"post": {
            "summary": "Pareto-optimal architectures for a size target (`archopt query --json`)",
            "description": "Answered with the current predictor versions (never trained in the request); "
                           "stale ones are retrained in the background. Identical queries are answered from "
                           "the stored query.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": QUERY_REQUEST}}},
            "responses": {"200": _json({"$ref": "#/components/schemas/Query"}, "archopt.query/1"),
                          **_errors(400, 404, 413, 422, 503)}}},
        "/v1/queries/{query_id}": {"get": {
            "summary": "A stored query's answer",
            "parameters": [_param("query_id", "path", {"type": "integer"}, "query id")],
            "responses": {"200": _json({"$ref": "#/components/schemas/Query"}, "archopt.query/1"),
                          **_errors(404, 422)}}},
        "/v1/evaluations": {"post": {
            "summary": "Ingest a JSONL, CSV or lm-eval results file (`archopt ingest`): one transaction, idempotent",
            "security": _WRITE,
            "parameters": [_param("format", "query", {"enum": ["jsonl", "csv", "lmeval"]},
                                  "default: from the Content-Type, the filename's extension, the contents"),
                           _param("filename", "query", {"type": "string"}, "how messages name the file"),
                           _param("allow_limit", "query", {"type": "boolean"}, "accept lm-eval results run with --limit")],
            "requestBody": {"required": True, "content": {"application/x-ndjson": {}, "text/csv": {},
                                                          "application/json": {}, "application/octet-stream": {}}},
            "responses": {"200": _json(obj, "archopt.ingest/1: counts of what was added and what was there"),
                          **_errors(400, 401, 403, 413, 422)}}},
        "/v1/predictors": {"get": {
            "summary": "Predictor versions with CV scores (archopt.predictors/1) and background training jobs",
            "parameters": [_param("model", "query", {"type": "string"}, "only this base model")],
            "responses": {"200": _json(obj, "archopt.predictors/1"), **_errors(404)}}},
        "/v1/predictors/train": {"post": {
            "summary": "Train new predictor versions (background: 202; with wait: 200 when done)",
            "security": _WRITE,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"], "properties": {
                    "model": {"type": "string"}, "metrics": {"type": "array", "items": {"type": "string"}},
                    "protocol": {"type": "integer"}, "seed": {"type": "integer"}, "wait": {"type": "boolean"}}}}}},
            "responses": {"200": _json(obj, "trained versions"), "202": _json(obj, "queued"),
                          **_errors(400, 401, 403, 404, 413, 422)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "archopt", "version": version,
                 "description": "Find the best pruned LLM for a size target: the archive, predictors and queries "
                                "of archopt over HTTP. Errors are {\"error\": message}."},
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                        "Query": QUERY_DOC, "Layer": LAYER},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "ARCHOPT_TOKEN or --token-file of archopt serve"}},
        },
    }
