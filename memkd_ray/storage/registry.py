"""Model registry on the run storage: the best checkpoint per benchmark/category, in the
entries of layout.RegistryLayout (best.json, claims/, history.parquet).

Concurrency: write-then-verify, not S3 conditional writes. Conditional PUTs (If-Match /
If-None-Match) are atomic on AWS S3 but not on every S3-compatible endpoint (moto's server, for
one, checks and writes in separate steps), and `file://` has none. Instead a promotion first
writes an immutable claim (a unique key, so no writer can clobber another), then settles:
list the claims, compute the winner, rewrite best.json/history.parquet if they disagree, and
repeat until a pass writes nothing. The last pass of the last writer saw every claim, so racing
promotions converge on the best claim, on any store with read-after-write consistency (AWS S3
since 2020, MinIO, local disks). A claim is only written after its checkpoint was read back and
its sha256 checked, so best.json never points to a missing or partial checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memkd_ray.checkpoint_format import (
    INFERENCE_FILES,
    META_FILE,
    WEIGHTS_FILE,
    parse_checkpoint_meta,
    parse_json_object,
    verify_checkpoint_dir,
)
from memkd_ray.config import from_dict
from memkd_ray.errors import CheckpointError, UserInputError
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.storage import Storage, open_object, open_storage, plain_name
from memkd_ray.storage.layout import (
    HISTORY_SCHEMA,
    RegistryLayout,
    RunLayout,
    read_results,
    read_table,
    registry_dir,
    runs_dir,
    write_table,
)

DEFAULT_METRIC = "image_auroc"
DEFAULT_TIEBREAK = "pixel_aupro"
MAX_SETTLE_PASSES = 50


@dataclass
class Promotion:
    promoted: bool
    candidate: dict[str, Any]
    best: dict[str, Any] | None


def parse_reference(reference: str) -> tuple[str, str]:
    """`benchmark/category` (optionally prefixed `registry:`) as a pair."""
    parts = reference.removeprefix("registry:").strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise UserInputError(f"{reference}: expected BENCHMARK/CATEGORY, e.g. mvtec/bottle")
    return plain_name("benchmark", parts[0]), plain_name("category", parts[1])


class Registry:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def _entry(self, benchmark: str, category: str) -> RegistryLayout:
        # Names are checked: one that leads elsewhere (a card's from checkpoint.json too) fails.
        return RegistryLayout(self.storage, benchmark, category)

    # Reading -----------------------------------------------------------------------------

    def best(self, benchmark: str, category: str) -> dict[str, Any] | None:
        path = self._entry(benchmark, category).best_path
        if not self.storage.exists(path):
            return None
        return self._read_card(path)

    def list(self, benchmark: str | None = None) -> list[dict[str, Any]]:
        """The best card of every benchmark/category (of one benchmark if given)."""
        root = registry_dir(self.storage, benchmark)
        paths = [p for p in self.storage.list_files(root)
                 if p.endswith(f"/{RegistryLayout.BEST_FILE}")]
        return [self._read_card(p) for p in paths]

    def history(self, benchmark: str, category: str) -> list[dict[str, Any]]:
        path = self._entry(benchmark, category).history_path
        if not self.storage.exists(path):
            return []
        return read_table(self.storage, path)

    # Promotion ---------------------------------------------------------------------------

    def card(self, checkpoint_uri: str) -> dict[str, Any]:
        """Model card of a stored checkpoint, after checking its weights' sha256."""
        base = self.storage.path_of(checkpoint_uri).rstrip("/")
        meta = parse_checkpoint_meta(self.read(f"{base}/{META_FILE}"),
                                     f"{checkpoint_uri}/{META_FILE}")
        digest, size = self.storage.sha256(f"{base}/{WEIGHTS_FILE}")
        if digest != meta["sha256"]:
            raise CheckpointError(f"{checkpoint_uri}: weights sha256 does not match "
                                  "checkpoint.json (partial upload or tampered)")
        config = meta["config"]
        parts = base.split("/")
        # The run id is the component after this storage's own runs/ (the root itself may
        # hold a "runs" folder name); a checkpoint outside runs/ has none.
        runs = runs_dir(self.storage) + "/"
        run_id = base.removeprefix(runs).split("/", 1)[0] if base.startswith(runs) else ""
        return {
            "benchmark": config["data"]["benchmark"],
            # Ray Train lays checkpoints out as .../<benchmark>/<category>/checkpoint_epoch_N.
            "category": meta.get("category") or parts[-2],
            "run_id": run_id,
            "checkpoint_uri": checkpoint_uri,
            "metrics": {k: float(meta["metrics"].get(k, math.nan)) for k in METRIC_KEYS},
            "epoch": meta["epoch"],
            "sha256": digest,
            "size_bytes": size,
            "teacher": meta["teacher"],
            "decision": meta.get("decision"),
            "package_version": meta["package_version"],
            "config_hash": from_dict(config).hash(),
        }

    def promote(
        self,
        checkpoint_uri: str,
        metric: str = DEFAULT_METRIC,
        tiebreak: str = DEFAULT_TIEBREAK,
        force: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> Promotion:
        """Make a checkpoint the best of its category if it beats the current best on
        (metric, tiebreak), or unconditionally with `force`.

        `metrics` replaces the checkpoint's own (a search evaluates its selected checkpoint on
        the test split after training, so checkpoint.json holds validation scores only).
        """
        for name in (metric, tiebreak):
            check_metric(name)
        candidate = self.card(checkpoint_uri)
        if metrics is not None:
            candidate["metrics"] = {k: float(metrics.get(k, math.nan)) for k in METRIC_KEYS}
        benchmark, category = candidate["benchmark"], candidate["category"]
        current = self.best(benchmark, category)
        if (not force and current is not None
                and _rank(candidate, metric, tiebreak) <= _rank(current, metric, tiebreak)):
            return Promotion(False, candidate, current)
        now = datetime.now(timezone.utc)
        claim_id = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"
        claim = {**candidate, "claim": claim_id, "forced": force, "metric": metric,
                 "tiebreak": tiebreak, "promoted_at": now.isoformat(timespec="seconds")}
        claims_dir = self._entry(benchmark, category).claims_dir
        self.storage.write_bytes(f"{claims_dir}/{claim_id}.json", self._dump(claim))
        best = self._settle(benchmark, category)
        return Promotion(best["claim"] == claim_id, candidate, best)

    def _settle(self, benchmark: str, category: str) -> dict[str, Any]:
        """Bring best.json and history.parquet in line with the claims; see module doc."""
        entry = self._entry(benchmark, category)
        for _ in range(MAX_SETTLE_PASSES):
            claims = self._claims(benchmark, category)
            winner = winning_claim(claims)
            wrote = False
            current = self.best(benchmark, category)
            if current is None or current.get("claim") != winner["claim"]:
                self.storage.write_bytes(entry.best_path, self._dump(winner))
                wrote = True
            if len(self.history(benchmark, category)) != len(claims):
                write_table(self.storage, entry.history_path, _history_rows(claims),
                            HISTORY_SCHEMA)
                wrote = True
            if not wrote:
                return winner
        raise RuntimeError(f"registry {benchmark}/{category}: promotions did not settle")

    def _claims(self, benchmark: str, category: str) -> list[dict[str, Any]]:
        paths = self.storage.list_files(self._entry(benchmark, category).claims_dir)
        return [self._read_card(p) for p in paths if p.endswith(".json")]

    def _read_card(self, path: str) -> dict[str, Any]:
        """A stored card (best.json or a claim), schema-checked, its pointer resolved in this
        store (never outside it)."""
        where = self.storage.uri_for(path)
        card = _parse_card(self.storage.read_bytes(path), where)
        return {**card, "checkpoint_uri": self.storage.resolve(card["checkpoint_uri"], where)}

    def _dump(self, card: dict[str, Any]) -> bytes:
        """A card as stored: its pointer relative to the store's root."""
        stored = {**card, "checkpoint_uri": self.storage.reference(card["checkpoint_uri"])}
        return (json.dumps(stored, indent=2, sort_keys=True) + "\n").encode()

    def read(self, path: str) -> bytes:
        """Bytes of a stored file; CheckpointError if it is missing."""
        if not self.storage.exists(path):
            raise CheckpointError(f"{self.storage.uri_for(path)}: not found")
        return self.storage.read_bytes(path)

    # Pulling -----------------------------------------------------------------------------

    def checkpoint_of_run(self, run_id: str, benchmark: str, category: str) -> str:
        layout = RunLayout(self.storage, run_id)
        if not self.storage.exists(layout.results_path):
            raise UserInputError(f"run {run_id}: no results.parquet under {self.storage.uri}")
        for row in read_results(layout):
            if row["benchmark"] == benchmark and row["category"] == category:
                if row["status"] != "ok":
                    raise UserInputError(f"run {run_id}: {benchmark}/{category} failed")
                return row["checkpoint_uri"]
        raise UserInputError(f"run {run_id}: no {benchmark}/{category}")

    def pull(self, checkpoint_uri: str, destination: str | Path) -> Path:
        """Download a checkpoint's inference files into `destination`, verified.

        Files land in a staging directory beside the destination and are checked (schema,
        sha256) before one rename makes them visible: a tampered or truncated object leaves
        nothing at the destination.
        """
        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise UserInputError(f"--to {destination}: directory exists and is not empty")
        destination.parent.mkdir(parents=True, exist_ok=True)
        base = self.storage.path_of(checkpoint_uri).rstrip("/")
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
        try:
            for name in INFERENCE_FILES:
                (staging / name).write_bytes(self.read(f"{base}/{name}"))
            try:
                verify_checkpoint_dir(staging)
            except CheckpointError as exc:  # name the stored object, not our staging copy
                raise CheckpointError(str(exc).replace(str(staging), checkpoint_uri)) from None
            if destination.exists():
                destination.rmdir()
            staging.rename(destination)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return destination


def check_metric(name: str) -> str:
    """`name` if the registry can rank by it, else a UserInputError."""
    if name not in METRIC_KEYS:
        raise UserInputError(f"--metric {name}: not one of {', '.join(METRIC_KEYS)}")
    return name


def winning_claim(claims: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The best claim since the latest forced one (a forced promotion resets the contest),
    ranked by each claim's own metric and tiebreak; earliest wins ties."""
    ordered = sorted(claims, key=lambda c: c["claim"])
    forced = [i for i, c in enumerate(ordered) if c["forced"]]
    contest = ordered[forced[-1]:] if forced else ordered
    best = contest[0]
    for claim in contest[1:]:
        if _rank(claim, best["metric"], best["tiebreak"]) > _rank(
            best, best["metric"], best["tiebreak"]
        ):
            best = claim
    return best


def _rank(card: dict[str, Any], metric: str, tiebreak: str) -> tuple[float, float]:
    def value(name: str) -> float:
        v = card["metrics"].get(name, math.nan)
        return -math.inf if v is None or math.isnan(v) else v

    return value(metric), value(tiebreak)


def _history_rows(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"promoted_at": c["promoted_at"], "claim": c["claim"], "run_id": c["run_id"],
             "checkpoint_uri": c["checkpoint_uri"], "sha256": c["sha256"],
             "forced": c["forced"], **c["metrics"]}
            for c in sorted(claims, key=lambda c: c["claim"])]


_CARD_FIELDS = {"benchmark": str, "category": str, "checkpoint_uri": str, "metrics": dict,
                "sha256": str, "claim": str, "run_id": str, "promoted_at": str,
                "size_bytes": int}


def _parse_card(data: bytes, where: str) -> dict[str, Any]:
    card = parse_json_object(data, where, _CARD_FIELDS)
    for key in METRIC_KEYS:
        if not isinstance(card["metrics"].get(key), (int, float)):
            raise CheckpointError(f"{where}: metric {key!r} missing or not a number")
    return card


def cache_root() -> Path:
    """Where pulled checkpoints are cached by sha256 (`MEMKD_RAY_CACHE` overrides)."""
    return Path(os.environ.get("MEMKD_RAY_CACHE", Path.home() / ".cache" / "memkd-ray"))


def fetch_checkpoint(reference: str, storage_uri: str) -> Path:
    """A local checkpoint directory for `reference`: a local path, `file://` or `s3://` URI
    of a checkpoint directory, or `registry:BENCHMARK/CATEGORY` (the best model in the
    registry of `storage_uri`). Remote checkpoints are verified and cached by content hash."""
    if reference.startswith("registry:"):
        registry = Registry(open_storage(storage_uri))
        benchmark, category = parse_reference(reference)
        card = registry.best(benchmark, category)
        if card is None:
            raise UserInputError(f"{reference}: no model registered under {storage_uri}")
        uri = card["checkpoint_uri"]
        base = registry.storage.path_of(uri)
    else:
        storage, base = open_object(reference)
        local = storage.local_path(base)
        if local is not None:  # a checkpoint directory here: read in place
            return local
        registry, uri = Registry(storage), storage.uri_for(base)
    meta_bytes = registry.read(f"{base}/{META_FILE}")
    parse_checkpoint_meta(meta_bytes, uri)
    # Keyed by the whole checkpoint.json, which holds the weights' sha256: equal weights
    # trained under another config (or data root) are another entry.
    cached = cache_root() / hashlib.sha256(meta_bytes).hexdigest()
    if not (cached / META_FILE).exists():
        try:
            registry.pull(uri, cached)
        except (OSError, UserInputError):
            if not (cached / META_FILE).exists():  # not a concurrent pull that won the race
                raise
    # The pull read checkpoint.json again: the checkpoint may have been replaced meanwhile.
    if (cached / META_FILE).read_bytes() != meta_bytes:
        shutil.rmtree(cached, ignore_errors=True)
        raise CheckpointError(f"{uri}: changed while it was downloaded; run the command again")
    return cached
