"""What the service accepts and answers, with no Ray and no web framework: routes, the bearer
token, the image body, and the JSON and PNG answers.

Every refusal is a `RequestError` carrying its HTTP status and a one-line reason; the service
answers it as `{"error": reason}` and goes on serving.
"""

from __future__ import annotations

import hmac
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from memkd_ray.data.sample import open_image, rgb_pixels
from memkd_ray.decision import Decision, decide
from memkd_ray.errors import DataError, ImageTooLargeError
from memkd_ray.predictions import heat_colours

MAX_BODY_BYTES = 16 * 2**20
"""Largest accepted request body: a 5-Mpx PNG is about 15 MB, and the model sees 256 px."""
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
_SCORE_ROUTE = re.compile(r"/v1/score/([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)")


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Served:
    """One served category: the registry's best checkpoint and what answers carry about it."""

    checkpoint_uri: str
    identity: dict[str, Any]
    """{"benchmark", "category", "run_id", "epoch", "sha256"}"""
    decision: Decision | None
    image_size: int

    def describe(self) -> dict[str, Any]:
        """The model and its decision, as `GET /v1/models` lists it."""
        decision = None if self.decision is None else self.decision.to_dict()
        return {"model": self.identity, "decision": decision}


def score_route(path: str) -> tuple[str, str]:
    """(benchmark, category) of `/v1/score/<benchmark>/<category>`; 404 otherwise."""
    match = _SCORE_ROUTE.fullmatch(path)
    if match is None:
        raise RequestError(404, f"{path[:200]}: no such route (POST /v1/score/<benchmark>/"
                                "<category>, GET /v1/models, GET /healthz)")
    return match.group(1), match.group(2)


def check_token(authorization: str | None, token: str | None) -> None:
    """With a token configured, the request must carry `Authorization: Bearer <token>`."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # Constant time: how much of a guess matched must not show in the answer's delay.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             token.encode()):
        raise RequestError(401, "missing or wrong bearer token")


def request_image(body: bytes, content_type: str | None, size: int) -> np.ndarray:
    """The body as the model's input, uint8 RGB (size, size, 3), decoded exactly as
    `predict` decodes a file; 413 for a body or image too large, 415 for a type other than
    PNG or JPEG (declared or found), 400 for anything that does not decode."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in IMAGE_TYPES:
        raise RequestError(415, f"Content-Type {declared or '(none)'!r}: send image/png or "
                                "image/jpeg")
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"body of {len(body)} bytes: at most {MAX_BODY_BYTES}")
    if not body:
        raise RequestError(400, "empty body: send one PNG or JPEG image")
    try:
        image = open_image(io.BytesIO(body), decode=True, name="the body")
    except ImageTooLargeError as exc:
        raise RequestError(413, str(exc)) from None
    except DataError as exc:
        raise RequestError(400, str(exc)) from None
    if image.format != IMAGE_TYPES[declared]:
        raise RequestError(415, f"the body is {image.format or 'not'} an image, Content-Type "
                                f"says {declared}")
    return rgb_pixels(image, size)


def score_answer(score: float, served: Served) -> dict[str, Any]:
    """The JSON answer of a score request."""
    (decided,) = decide([score], served.decision)
    threshold = None if served.decision is None else served.decision.threshold
    return {**decided, "threshold": threshold, "model": served.identity}


def map_png(anomaly_map: np.ndarray, decision: Decision | None) -> bytes:
    """The anomaly map as a colour PNG. With a decision, one colour scale for every image of
    the category: blue at 0, yellow-red from the threshold up (the image score is a mean of
    the map's largest values, so map values and the threshold share a scale); without one, the
    map's own range."""
    if decision is not None and decision.threshold > 0:
        values = anomaly_map / (2 * decision.threshold)
    else:
        low, high = float(anomaly_map.min()), float(anomaly_map.max())
        values = (anomaly_map - low) / max(high - low, 1e-12)
    buffer = io.BytesIO()
    Image.fromarray(heat_colours(values)).save(buffer, format="PNG")
    return buffer.getvalue()
