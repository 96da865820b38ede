"""The OpenAPI 3.1 description of every endpoint, served at /openapi.json.

With AUTH_TOKENS_FILE set, each operation's ``security`` is the scope app/auth.py gives
the endpoint that serves it, found through the app's own URL rules: one list of scopes.
"""

from __future__ import annotations

import re

from werkzeug.routing import Map

from app import __version__
from app.auth import REALM, required_scope
from app.config import Config

IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    reasons = {400: "Unreadable input", 404: "Unknown model", 413: "Body or batch too large",
               415: "Unsupported media type", 422: "Invalid image or array",
               500: "The model failed on valid input",
               503: "Model not loaded, or its queue is full (Retry-After)",
               504: "No answer within REQUEST_TIMEOUT_MS"}
    return {str(s): _json(_ref("Error"), reasons[s]) for s in statuses}


NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "Model name (a folder under MODELS_DIR)"}
PREPROCESS = {"name": "preprocess", "in": "query", "required": False,
              "schema": {"type": "string", "enum": ["auto", "none"], "default": "auto"},
              "description": "'none' takes 28×28 images already in MNIST form as they are"}
EXPLAIN = {"name": "explain", "in": "query", "required": False,
           "schema": {"type": "string", "enum": ["0", "1"], "default": "0"},
           "description": "'1' adds input_png: the 28×28 image the model received, base64 PNG"}
PLOT = {"name": "plot", "in": "path", "required": True,
        "schema": {"type": "string", "enum": ["history", "confusion", "samples"]}}
BATCH_SIZE = {"name": "batch_size", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "default": 1},
              "description": "Batch size the memory estimates are scaled for"}

VERSION = {"name": "version", "in": "path", "required": True,
           "schema": {"type": "integer", "minimum": 0},
           "description": "A loaded version (see MODEL_VERSION_POLICY)"}
LABEL = {"name": "label", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "A version label of MODEL_CONFIG_FILE (stable, canary, …)"}
TF_SERVING_DOCS = {"description": "TensorFlow Serving REST API",
                   "url": "https://www.tensorflow.org/tfx/serving/api_rest"}
V2_DOCS = {"description": "Open Inference Protocol (KServe V2)",
           "url": "https://kserve.github.io/website/docs/concepts/architecture/data-plane/"
                  "v2-protocol"}
STATS_DOCS = {"description": "Triton's statistics extension",
              "url": "https://github.com/triton-inference-server/server/blob/main/docs/"
                     "protocol/extension_statistics.md"}

SCHEMAS = {
    "PlainError": {"type": "object", "required": ["error"],
                   "properties": {"error": {"type": "string"}},
                   "description": "The error shape of TF Serving and the V2 protocol"},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "ModelRef": {"type": "object", "required": ["name", "version"],
                 "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}},
    "Prediction": {"type": "object", "required": ["digit", "confidence", "probabilities"],
                   "properties": {
                       "digit": {"type": "integer", "minimum": 0, "maximum": 9},
                       "confidence": {"type": "number"},
                       "probabilities": {"type": "array", "items": {"type": "number"},
                                         "minItems": 10, "maxItems": 10},
                       "input_png": {"type": "string", "contentEncoding": "base64",
                                     "description": "with ?explain=1"}}},
    "PredictResponse": {"type": "object", "required": ["model", "predictions"], "properties": {
        "model": _ref("ModelRef"),
        "predictions": {"type": "array", "items": _ref("Prediction")}}},
    "Instances": {"type": "object", "required": ["instances"], "properties": {"instances": {
        "type": "array", "minItems": 1,
        "items": {"oneOf": [
            {"type": "array", "description": "28×28 numbers in [0, 1], white on black",
             "items": {"type": "array"}},
            {"type": "object", "required": ["b64"],
             "properties": {"b64": {"type": "string", "contentEncoding": "base64"}}}]}}}},
    "ModelInfo": {"type": "object", "required": [
        "name", "version", "versions", "loaded_versions", "rejected", "arch", "created",
        "test_accuracy", "load_seconds", "runtime", "input", "plots"], "properties": {
        "name": {"type": "string"},
        "version": {"type": "integer", "description": "the version requests get by default"},
        "versions": {"type": "array", "items": {"type": "integer"},
                     "description": "version folders on disk"},
        "loaded_versions": {"type": "array", "items": {"type": "integer"},
                            "description": "those MODEL_VERSION_POLICY loaded"},
        "rejected": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "folder name → why it is not served (a failed check, "
                                    "or a name that is no version number)"},
        "arch": {"type": ["string", "null"]}, "created": {"type": ["string", "null"]},
        "test_accuracy": {"type": ["number", "null"]}, "load_seconds": {"type": "number"},
        "runtime": {"enum": ["savedmodel", "litert"],
                    "description": "what runs it: TensorFlow, or LiteRT (PREFER_TFLITE_MODEL)"},
        "input": {"type": ["object", "null"], "description": "metadata.json's input contract"},
        "labels": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "version label → the loaded version it points at "
                                  "(MODEL_CONFIG_FILE)"},
        "pending_labels": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "label → why the file's version is not in force"},
        "traffic": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "label → percent of requests naming no version"},
        "shadow": {"type": "array", "description": "shadow comparisons by version pair",
                   "items": _ref("ShadowPair")},
        "plots": {"type": "array", "items": {
            "type": "object", "required": ["title", "url"],
            "properties": {"title": {"type": "string"}, "url": {"type": "string"}}}}}},
    "ShadowPair": {"type": "object", "required": [
        "label", "percent", "serving", "shadow", "compared", "agreement",
        "mean_abs_difference"], "properties": {
        "label": {"type": "string"}, "percent": {"type": "number"},
        "serving": {"type": "integer"}, "shadow": {"type": "integer"},
        "compared": {"type": "integer", "description": "images run on both"},
        "agreement": {"type": ["number", "null"], "description": "share with the same digit"},
        "mean_abs_difference": {"type": ["number", "null"],
                                "description": "of the ten probabilities, per image"}}},
    "ModelList": {"type": "object", "required": ["default", "models", "rejected"],
                  "properties": {
        "default": {"type": "string"},
        "models": {"type": "array", "items": _ref("ModelInfo")},
        "rejected": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "model → why none of its versions is served"}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"const": "ok"}}},
    "Ready": {"type": "object", "required": ["status", "default", "models"], "properties": {
        "status": {"const": "ready"}, "default": {"type": "string"},
        "models": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "loaded model → its default version"}}},
    "Summary": {"type": "object", "required": ["model", "arch", "layers", "totals", "memory",
                                               "test_accuracy", "per_class_accuracy", "notes"],
                "properties": {
                    "model": _ref("ModelRef"), "arch": {"type": ["string", "null"]},
                    "layers": {"type": "array", "items": {"type": "object"}},
                    "totals": {"type": "object"}, "memory": {"type": "object"},
                    "test_accuracy": {"type": ["number", "null"]},
                    "per_class_accuracy": {"type": ["array", "null"],
                                           "items": {"type": "object"}},
                    "notes": {"type": "array", "items": {"type": "string"}}}},
}


def _predict_operation(summary: str, parameters: list) -> dict:
    image_content = {t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}
    return {"post": {
        "summary": summary,
        "parameters": parameters,
        "requestBody": {"required": True, "content": {
            **image_content,
            "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {
                "type": "string", "format": "binary"}}},
            "application/json": {"schema": _ref("Instances")},
            "application/x-npy": {"schema": {"type": "string", "format": "binary",
                                             "description": "N×28×28 digits, .npy"}},
        }},
        "responses": {"200": _json(_ref("PredictResponse"), "One prediction per image, "
                                   "in order"),
                      **_errors(400, 404, 413, 415, 422, 500, 503, 504)},
    }}


def _get(summary: str, schema: dict, parameters: list | None = None, errors=(404, 503)) -> dict:
    return {"get": {"summary": summary, "parameters": parameters or [],
                    "responses": {"200": _json(schema, "OK"), **_errors(*errors)}}}


def _protocol(method: str, summary: str, docs: dict, parameters: list,
              body: bool = False) -> dict:
    """An endpoint of another server's protocol: its documentation is the schema."""
    plain = {str(s): _json(_ref("PlainError"), "Error")
             for s in (400, 404, 413, 415, 422, 500, 503, 504)}
    operation = {"summary": summary, "externalDocs": docs, "parameters": parameters,
                 "responses": {"200": _json({"type": "object"}, "As the protocol defines"),
                               **plain}}
    if body:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {
                "type": "string", "format": "binary",
                "description": "V2 binary tensor extension"}}}}
    return {method: operation}


def _repository_index(docs: dict) -> dict:
    """The model-repository extension's index: an array, not an object."""
    row = {"type": "object", "required": ["name", "version", "state"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "state": {"enum": ["READY", "LOADING", "UNAVAILABLE"]},
        "reason": {"type": "string"}}}
    return {"post": {
        "summary": "Every model and version folder with its state and reason",
        "externalDocs": docs, "parameters": [],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
        "responses": {"200": _json({"type": "array", "items": row}, "The index"),
                      "400": _json(_ref("PlainError"), "Not a JSON object")}}}


def _protocol_paths() -> dict:
    tf, v2 = TF_SERVING_DOCS, V2_DOCS
    paths = {}
    for prefix, params in (("/{name}", [NAME]), ("/{name}/versions/{version}",
                                                  [NAME, VERSION])):
        paths.update({
            f"/v1/models{prefix}": _protocol("get", "Model version status", tf, params),
            f"/v1/models{prefix}/metadata": _protocol("get", "SignatureDefs", tf, params),
            f"/v1/models{prefix}:predict": _protocol(
                "post", "Predict (instances or inputs)", tf, [*params, PREPROCESS], True),
            f"/v2/models{prefix}": _protocol("get", "Model metadata", v2, params),
            f"/v2/models{prefix}/ready": _protocol("get", "Model readiness", v2, params),
            f"/v2/models{prefix}/stats": _protocol(
                "get", "Counts and durations of the model's (version's) inferences, all "
                "workers together", STATS_DOCS, params),
            f"/v2/models{prefix}/infer": _protocol(
                "post", "Inference on FP32/UINT8 or BYTES (image) tensors", v2,
                [*params, PREPROCESS], True),
        })
    paths.update({
        "/v2": _protocol("get", "Server metadata", v2, []),
        "/v2/health/live": _protocol("get", "Liveness", v2, []),
        "/v2/health/ready": _protocol("get", "Readiness", v2, []),
        "/v2/repository/index": _repository_index(v2),
        "/v2/models/stats": _protocol("get", "Statistics of every loaded version",
                                      STATS_DOCS, []),
        "/models/{name}/versions/{version}/predict": _predict_operation(
            "Classify images with one version of a model", [NAME, VERSION, PREPROCESS,
                                                             EXPLAIN]),
        "/models/{name}/labels/{label}/predict": _predict_operation(
            "Classify images with the version a label points at",
            [NAME, LABEL, PREPROCESS, EXPLAIN]),
        "/v1/models/{name}/labels/{label}": _protocol(
            "get", "Status of the version a label points at", tf, [NAME, LABEL]),
        "/v1/models/{name}/labels/{label}/metadata": _protocol(
            "get", "SignatureDefs of the labelled version", tf, [NAME, LABEL]),
        "/v1/models/{name}/labels/{label}:predict": _protocol(
            "post", "Predict on the labelled version", tf, [NAME, LABEL, PREPROCESS], True),
        "/v2/models/{name}/labels/{label}/infer": _protocol(
            "post", "Inference on the labelled version (an extension: V2 has no labels)",
            v2, [NAME, LABEL, PREPROCESS], True),
    })
    return paths


BEARER = {"type": "http", "scheme": "bearer",
          "description": f"A token of AUTH_TOKENS_FILE (realm {REALM}); each operation "
                         "lists the scope it needs: predict or admin"}
# Flask's <converter:name> and <name> → OpenAPI's {name}.
RULE_PARAMETER = re.compile(r"<(?:[^<>:]+:)?([^<>:]+)>")


def endpoints(url_map: Map) -> dict[tuple[str, str], str]:
    """(OpenAPI path, method) → the Flask endpoint that serves it."""
    return {(RULE_PARAMETER.sub(r"{\1}", rule.rule), method.lower()): rule.endpoint
            for rule in url_map.iter_rules()
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def _secure(paths: dict, served_by: dict[tuple[str, str], str]) -> None:
    """Each operation's security and its 401/403, from its endpoint's scope; an
    operation no rule serves needs ``predict``, as an unknown path does."""
    for path, operations in paths.items():
        plain = path.startswith(("/v1/", "/v2"))
        for method, operation in operations.items():
            scope = required_scope(served_by.get((path, method)))
            operation["security"] = [] if scope is None else [{"bearerAuth": [scope]}]
            if scope is not None:
                shape = _ref("PlainError" if plain else "Error")
                operation["responses"].update({
                    "401": _json(shape, "No token, or not one of AUTH_TOKENS_FILE's"),
                    "403": _json(shape, f"The token lacks the scope {scope}")})


def openapi_spec(config: Config, url_map: Map) -> dict:
    """The document; limits and security are filled in from the running configuration."""
    spec = _document(config)
    if config.auth_tokens_file:
        spec["components"]["securitySchemes"] = {"bearerAuth": BEARER}
        _secure(spec["paths"], endpoints(url_map))
    return spec


def _document(config: Config) -> dict:
    return {
        "openapi": "3.1.0",
        "x-web-pages": ["/", "/model"],
        "info": {"title": "MNIST digit recognition", "version": __version__,
                 "description": f"Limits: body {config.max_content_length} bytes, "
                                f"{config.max_batch} images per request, "
                                f"{config.max_image_pixels} pixels per image."},
        "paths": {
            "/predict": _predict_operation("Classify images with the default model",
                                           [PREPROCESS, EXPLAIN]),
            "/models/{name}/predict": _predict_operation("Classify images with a named model",
                                                         [NAME, PREPROCESS, EXPLAIN]),
            "/models/{name}/plots/{plot}.png": {"get": {
                "summary": "A training plot exported with the model",
                "parameters": [NAME, PLOT],
                "responses": {"200": {"description": "PNG image", "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                    **_errors(400, 404, 503)}}},
            "/summary": _get("The default model's layer table and memory", _ref("Summary"),
                             [BATCH_SIZE], errors=(400, 503)),
            "/models/{name}/summary": _get("A model's layer table and memory",
                                           _ref("Summary"), [NAME, BATCH_SIZE],
                                           errors=(400, 404, 503)),
            "/models": _get("Every loaded model and its versions", _ref("ModelList"),
                            errors=()),
            "/models/{name}": _get("One model", _ref("ModelInfo"), [NAME]),
            "/health": _get("Liveness", _ref("Health"), errors=()),
            "/ready": _get("Readiness: 200 when the default model is loaded",
                           _ref("Ready"), errors=(503,)),
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": _get("This document", {"type": "object"}, errors=()),
            **_protocol_paths(),
        },
        "components": {"schemas": SCHEMAS},
    }
